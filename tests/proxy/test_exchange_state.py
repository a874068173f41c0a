"""The exchange state machine (exchange_state.py), driven with events and parsed messages only: no
sockets. The spec below is written out by hand; the machine's compiled table must match it."""

from __future__ import annotations

import pytest

from dataplane.proxy.http import exchange_state as xs
from dataplane.proxy.http.codec import EndOfMessage, Request, RequestParser
from dataplane.proxy.http.exchange import FRAME_TUNNEL, framing, keep_alive, skip_body
from dataplane.proxy.http.exchange_state import (
    CLIENT_CLOSED,
    CLIENT_ERROR,
    CLOSED,
    DONE,
    ERROR,
    IDLE,
    INFORMATIONAL,
    MIGHT_SWITCH,
    MUST_CLOSE,
    NEXT_CYCLE,
    PROPOSE,
    REQUEST,
    REQUEST_END,
    RESPONSE,
    RESPONSE_CLOSE,
    RESPONSE_END,
    SEND_BODY,
    SEND_RESPONSE,
    SERVER_ERROR,
    SWITCH,
    SWITCHED,
    Exchange,
    LocalProtocolError,
)
from tests.proxy.test_exchange import request, response

ALL_EVENTS = range(len(xs.EVENT_NAMES))

# How to reach each (client, server, flags) the machine can be in, from a fresh connection.
PATHS: dict[tuple[int, int, int], tuple[int, ...]] = {}


def _paths() -> None:
    todo = [((IDLE, IDLE, xs.KEEP), ())]
    while todo:
        key, path = todo.pop(0)
        if key in PATHS:
            continue
        PATHS[key] = path
        for ev, node in xs.TABLE[key][3].items():
            todo.append((node[:3], (*path, ev)))


_paths()

# The legal transitions, by hand: (client, server, flags) --event--> (client, server, flags).
K, P, KP = xs.KEEP, xs.PROPOSAL, xs.KEEP | xs.PROPOSAL
SPEC = {
    # a plain keep-alive exchange, and the next one
    ((IDLE, IDLE, K), REQUEST): (SEND_BODY, SEND_RESPONSE, K),
    ((SEND_BODY, SEND_RESPONSE, K), REQUEST_END): (DONE, SEND_RESPONSE, K),
    ((DONE, SEND_RESPONSE, K), RESPONSE): (DONE, SEND_BODY, K),
    ((DONE, SEND_BODY, K), RESPONSE_END): (DONE, DONE, K),
    ((DONE, DONE, K), NEXT_CYCLE): (IDLE, IDLE, K),
    # 100 Continue, and the proxy's own 1xx before the request ended
    ((SEND_BODY, SEND_RESPONSE, K), INFORMATIONAL): (SEND_BODY, SEND_RESPONSE, K),
    ((DONE, SEND_RESPONSE, K), INFORMATIONAL): (DONE, SEND_RESPONSE, K),
    # the connection closes after this response
    ((DONE, SEND_RESPONSE, K), RESPONSE_CLOSE): (MUST_CLOSE, SEND_BODY, 0),
    ((MUST_CLOSE, SEND_BODY, 0), RESPONSE_END): (MUST_CLOSE, MUST_CLOSE, 0),
    # an early response while the body still comes: always a close
    ((SEND_BODY, SEND_RESPONSE, K), RESPONSE): (SEND_BODY, SEND_BODY, K),
    ((SEND_BODY, SEND_BODY, K), RESPONSE_END): (SEND_BODY, MUST_CLOSE, K),
    ((SEND_BODY, SEND_RESPONSE, K), RESPONSE_CLOSE): (SEND_BODY, SEND_BODY, 0),
    ((SEND_BODY, SEND_BODY, 0), REQUEST_END): (MUST_CLOSE, SEND_BODY, 0),
    ((SEND_BODY, SEND_BODY, 0), RESPONSE_END): (SEND_BODY, MUST_CLOSE, 0),
    # upgrades and CONNECT: proposed, then accepted or refused
    ((SEND_BODY, SEND_RESPONSE, K), PROPOSE): (SEND_BODY, SEND_RESPONSE, KP),
    ((DONE, SEND_RESPONSE, K), PROPOSE): (MIGHT_SWITCH, SEND_RESPONSE, KP),
    ((SEND_BODY, SEND_RESPONSE, KP), REQUEST_END): (MIGHT_SWITCH, SEND_RESPONSE, KP),
    ((MIGHT_SWITCH, SEND_RESPONSE, KP), SWITCH): (SWITCHED, SWITCHED, KP),
    ((MIGHT_SWITCH, SEND_RESPONSE, KP), RESPONSE): (DONE, SEND_BODY, K),
    ((MIGHT_SWITCH, SEND_RESPONSE, KP), RESPONSE_CLOSE): (MUST_CLOSE, SEND_BODY, 0),
    ((SEND_BODY, SEND_RESPONSE, KP), RESPONSE): (SEND_BODY, SEND_BODY, K),
    # the client goes away between requests
    ((IDLE, IDLE, K), CLIENT_CLOSED): (CLOSED, MUST_CLOSE, K),
    ((DONE, DONE, K), CLIENT_CLOSED): (CLOSED, MUST_CLOSE, K),
    ((DONE, SEND_RESPONSE, K), CLIENT_CLOSED): (CLOSED, SEND_RESPONSE, K),
    # a head that never made a request is answered, then the connection closes
    ((IDLE, IDLE, K), CLIENT_ERROR): (ERROR, IDLE, K),
    ((ERROR, IDLE, K), RESPONSE_CLOSE): (ERROR, SEND_BODY, 0),
    ((ERROR, SEND_BODY, 0), RESPONSE_END): (ERROR, MUST_CLOSE, 0),
    # errors: mid-body (answered, then closed), mid-response (closed)
    ((SEND_BODY, SEND_RESPONSE, K), CLIENT_ERROR): (ERROR, SEND_RESPONSE, K),
    ((ERROR, SEND_RESPONSE, K), RESPONSE_CLOSE): (ERROR, SEND_BODY, 0),
    ((DONE, SEND_BODY, K), SERVER_ERROR): (MUST_CLOSE, ERROR, K),
    ((SEND_BODY, SEND_BODY, K), SERVER_ERROR): (SEND_BODY, ERROR, K),
    ((SWITCHED, SWITCHED, KP), CLIENT_ERROR): (ERROR, SWITCHED, K),
}


def at(key: tuple[int, int, int]) -> Exchange:
    """A machine in state `key`, reached by events from a fresh one."""
    x = Exchange()
    for ev in PATHS[key]:
        x.event(ev)
    assert (x.client, x.server, x.flags) == key
    return x


def states(x: Exchange) -> tuple[int, int]:
    return x.client, x.server


def drive(x: Exchange, *events: int) -> tuple[int, int]:
    for ev in events:
        x.event(ev)
    return states(x)


@pytest.mark.parametrize("key,ev", sorted(SPEC), ids=lambda v: repr(v))
def test_every_transition_of_the_spec(key: tuple[int, int, int], ev: int) -> None:
    x = at(key)
    x.event(ev)
    assert (x.client, x.server, x.flags) == SPEC[key, ev]


def test_every_reachable_state_and_event_is_a_transition_or_refused() -> None:
    """Each of the events x every reachable state: legal ones land where the table says (and the
    spec, where it has the pair); the others raise, leaving the states as they were."""
    legal = refused = 0
    for key in PATHS:
        for ev in ALL_EVENTS:
            x = at(key)
            nxt = xs.TABLE[key][3].get(ev)
            if nxt is None:
                with pytest.raises(LocalProtocolError) as exc:
                    x.event(ev)
                assert exc.value.status == (400 if ev <= CLIENT_ERROR else 502)
                assert (x.client, x.server, x.flags) == key
                refused += 1
            else:
                x.event(ev)
                assert (x.client, x.server, x.flags) == nxt[:3]
                if (key, ev) in SPEC:
                    assert nxt[:3] == SPEC[key, ev]
                legal += 1
    assert set(SPEC) <= {(k, e) for k in PATHS for e in xs.TABLE[k][3]}
    assert legal > 100 and refused > 100


def test_invariants_of_the_table() -> None:
    for (client, server, flags), node in xs.TABLE.items():
        row = node[3]
        assert CLIENT_ERROR in row and SERVER_ERROR in row  # an error is always possible
        assert (NEXT_CYCLE in row) == (client == DONE and server == DONE)
        assert (REQUEST in row) == (client == IDLE and server == IDLE)
        assert (SWITCH in row) == (client == MIGHT_SWITCH and server == SEND_RESPONSE)
        assert (client == SWITCHED) <= (server in (SWITCHED, ERROR))
        assert (client == MIGHT_SWITCH) <= bool(flags & xs.PROPOSAL)
        if not flags & xs.KEEP:
            assert DONE not in (client, server)  # a closing connection never reaches DONE
        for nxt in row.values():
            assert nxt is xs.TABLE[nxt[:3]]  # rows are shared: an event allocates nothing


def test_refused_events() -> None:
    x = Exchange()
    for ev in (REQUEST_END, RESPONSE_END, SWITCH, NEXT_CYCLE, PROPOSE, INFORMATIONAL, RESPONSE):
        with pytest.raises(LocalProtocolError):
            x.event(ev)
    drive(x, REQUEST)
    with pytest.raises(LocalProtocolError, match="REQUEST not allowed with client SEND_BODY"):
        x.event(REQUEST)  # a second request before the first is over
    with pytest.raises(LocalProtocolError) as exc:
        x.event(SWITCH)  # nobody proposed it
    assert exc.value.status == 502
    drive(x, REQUEST_END, RESPONSE)
    with pytest.raises(LocalProtocolError):
        x.event(NEXT_CYCLE)  # the response is still going


def exchange(x: Exchange, raw_req: bytes, raw_resp: bytes, draining: bool = False) -> bool:
    """One exchange as the shell drives it (request read whole, then the response); returns the
    keep-alive decision."""
    req = request(raw_req)
    x.event(REQUEST)
    if req.upgrade is not None or req.method == b"CONNECT":
        x.event(PROPOSE)
    x.event(REQUEST_END)
    resp = response(raw_resp, req.method)
    frame, keep, _ = framing(req, resp, keep_alive(req, x.request_complete(), draining))
    x.event(SWITCH if frame == FRAME_TUNNEL else RESPONSE if keep else RESPONSE_CLOSE)
    if frame != FRAME_TUNNEL:
        x.event(RESPONSE_END)
    return keep


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
GET10_KEEP = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"


@pytest.mark.parametrize("raw_req,raw_resp,keep", [
    (GET, OK_EMPTY, True),
    # the client asks to close; an HTTP/1.0 client's default is close
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", OK_EMPTY, False),
    (b"GET / HTTP/1.0\r\n\r\n", OK_EMPTY, False),
    (GET10_KEEP, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", True),
    # the server closes: a 1.0 client only learns the end of an unframed body from our close
    (GET10_KEEP, b"HTTP/1.0 200 OK\r\n\r\n", False),
    # ... a 1.1 client gets it chunked, and the connection stays (the upstream one is not reused)
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n", True),
    (GET, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
    # no body whatever the fields say
    (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\n\r\n", True),
    (GET10_KEEP, b"HTTP/1.1 304 Not Modified\r\n\r\n", True),
])
def test_keep_alive_or_close(raw_req: bytes, raw_resp: bytes, keep: bool) -> None:
    x = Exchange()
    assert exchange(x, raw_req, raw_resp) is keep
    assert x.must_close() is not keep
    assert x.next_cycle() is keep
    if keep:
        assert states(x) == (IDLE, IDLE)
    else:
        assert states(x) == (MUST_CLOSE, MUST_CLOSE)
        with pytest.raises(LocalProtocolError):
            x.event(REQUEST)


def test_draining_closes_after_the_response() -> None:
    x = Exchange()
    assert not exchange(x, GET, OK_EMPTY, draining=True)
    assert x.must_close()


def test_100_continue() -> None:
    """The proxy answers Expect itself (a 1xx before the body), then the exchange goes on."""
    x = Exchange()
    assert drive(x, REQUEST, INFORMATIONAL) == (SEND_BODY, SEND_RESPONSE)
    assert not x.request_complete()
    assert drive(x, REQUEST_END, RESPONSE, RESPONSE_END) == (DONE, DONE)
    assert x.next_cycle()


def test_upgrade_accepted() -> None:
    x = Exchange()
    keep = exchange(x, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert keep and states(x) == (SWITCHED, SWITCHED)
    assert not x.must_close() and not x.next_cycle()
    for ev in (REQUEST, RESPONSE_END, NEXT_CYCLE):
        with pytest.raises(LocalProtocolError):
            x.event(ev)


def test_connect_accepted_with_a_2xx() -> None:
    x = Exchange()
    exchange(x, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n")
    assert states(x) == (SWITCHED, SWITCHED)


def test_upgrade_refused_and_http_goes_on() -> None:
    x = Exchange()
    keep = exchange(x, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert keep and states(x) == (DONE, DONE) and not x.flags & xs.PROPOSAL
    assert drive(x, NEXT_CYCLE, REQUEST) == (SEND_BODY, SEND_RESPONSE)
    x.event(REQUEST_END)
    with pytest.raises(LocalProtocolError):
        x.event(SWITCH)  # the refused proposal does not carry over to the next request


def test_a_switch_before_the_request_ended_is_refused() -> None:
    x = Exchange()
    drive(x, REQUEST, PROPOSE)
    with pytest.raises(LocalProtocolError) as exc:
        x.event(SWITCH)
    assert exc.value.status == 502 and states(x) == (SEND_BODY, SEND_RESPONSE)


def test_a_client_error_mid_body_is_answered_then_closed() -> None:
    x = Exchange()
    drive(x, REQUEST, CLIENT_ERROR)
    assert states(x) == (ERROR, SEND_RESPONSE) and not x.request_complete()
    assert drive(x, RESPONSE_CLOSE, RESPONSE_END) == (ERROR, MUST_CLOSE)
    assert x.must_close() and not x.next_cycle()


def test_an_upstream_error_mid_response_closes() -> None:
    x = Exchange()
    assert drive(x, REQUEST, REQUEST_END, RESPONSE, SERVER_ERROR) == (MUST_CLOSE, ERROR)
    assert x.must_close()
    with pytest.raises(LocalProtocolError):
        x.event(RESPONSE_END)


def test_a_bad_head_is_answered_then_closed() -> None:
    x = Exchange()
    assert drive(x, CLIENT_ERROR, RESPONSE_CLOSE, RESPONSE_END) == (ERROR, MUST_CLOSE)
    assert x.must_close()


def test_pipelined_requests_one_exchange_at_a_time() -> None:
    """Three requests in one read: each starts only once the previous exchange is over."""
    parser = RequestParser()
    parser.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
                b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    x = Exchange()
    targets = []
    for _ in range(3):
        req = parser.next_event()
        assert isinstance(req, Request)
        targets.append(req.target)
        x.event(REQUEST)
        ev = req
        while not isinstance(ev, EndOfMessage):
            ev = parser.next_event()
            with pytest.raises(LocalProtocolError):
                x.event(REQUEST)  # the next request waits for this exchange
        x.event(REQUEST_END)
        keep = keep_alive(req, x.request_complete(), False)
        drive(x, RESPONSE if keep else RESPONSE_CLOSE, RESPONSE_END)
        x.next_cycle()
    assert targets == [b"/1", b"/2", b"/3"]
    assert x.must_close()  # the third asked to close


def test_a_local_reply_skips_the_body_already_here() -> None:
    """A request answered locally: the body bytes already read are dropped (counted), and only a
    body that ended lets the connection go on to the next request."""
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
    req = parser.next_event()
    x = Exchange()
    x.event(REQUEST)
    assert skip_body(parser) == (5, False)
    assert not keep_alive(req, x.request_complete(), False)  # the rest would be taken for a request
    parser.feed(b"67890GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert skip_body(parser) == (5, True)
    x.event(REQUEST_END)
    assert keep_alive(req, x.request_complete(), False)
    drive(x, RESPONSE, RESPONSE_END)
    assert x.next_cycle() and isinstance(parser.next_event(), Request)  # the pipelined one is intact
