"""The exchange rules (exchange.py), the router's decisions (router.py), the retry policy
(policy.py) and the request filters (filters.py), driven with parsed messages only: no sockets."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from dataplane.proxy.cluster import CONNECT_FAILURE, RESET, TIMEOUT
from dataplane.proxy.http import filters, policy
from dataplane.proxy.http.codec import Data, EndOfMessage, Request, RequestParser, Response, ResponseParser
from dataplane.proxy.http.exchange import (
    FRAME_AS_IS,
    FRAME_CHUNK,
    FRAME_RAW,
    FRAME_TUNNEL,
    LocalReply,
    connection_line,
    forward_fields,
    forward_head,
    framing,
    keep_alive,
    local_reply,
    response_fields,
    wants_continue,
)
from dataplane.proxy.http.options import DEFAULT
from dataplane.proxy.http.router import Forward, Plan, decide
from dataplane.proxy.routing import HeaderOps, RetryPolicy, Route


def request(raw: bytes) -> Request:
    parser = RequestParser()
    parser.feed(raw)
    ev = parser.next_event()
    assert isinstance(ev, Request), ev
    return ev


def response(raw: bytes, method: bytes = b"GET") -> Response:
    parser = ResponseParser()
    parser.request_sent(method)
    parser.feed(raw)
    ev = parser.next_event()
    assert isinstance(ev, Response), ev
    return ev


GET11 = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
GET10 = b"GET / HTTP/1.0\r\nhost: a\r\n\r\n"


# --- keep-alive ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "done", "draining", "keep"), [
    (GET11, True, False, True),
    (GET10, True, False, False),  # 1.0 defaults to close
    (b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n", True, False, True),
    (b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n", True, False, False),
    (GET11, False, False, False),  # the body was not read whole: it would be taken for a request
    (GET11, True, True, False),  # draining
])
def test_keep_alive(raw: bytes, done: bool, draining: bool, keep: bool) -> None:
    assert keep_alive(request(raw), done, draining) is keep


def test_connection_line_says_close_or_keep_alive_to_a_1_0_client() -> None:
    assert connection_line(False, b"1.1") == b"connection: close"
    assert connection_line(True, b"1.1") is None
    assert connection_line(True, b"1.0") == b"connection: keep-alive"


# --- body framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("req_raw", "resp_raw", "frame", "keep", "lines"), [
    (GET11, b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", FRAME_AS_IS, True, ()),
    (GET11, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", FRAME_CHUNK, True,
     (b"transfer-encoding: chunked",)),
    # read until the server's close: chunked for the client
    (GET11, b"HTTP/1.0 200 OK\r\n\r\n", FRAME_CHUNK, True, (b"transfer-encoding: chunked",)),
    # a 1.0 client: our close ends the body
    (GET10, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", FRAME_RAW, False, ()),
    (b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
     FRAME_AS_IS, True, (b"transfer-encoding: chunked",)),
    (GET11, b"HTTP/1.1 204 No Content\r\n\r\n", FRAME_AS_IS, True, ()),
    (GET11, b"HTTP/1.1 304 Not Modified\r\n\r\n", FRAME_AS_IS, True, ()),
    (b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
     b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
     FRAME_TUNNEL, True,
     (b"connection: upgrade", b"upgrade: websocket")),
    (b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", FRAME_TUNNEL, True,
     (b"connection: upgrade",)),
])
def test_framing(req_raw: bytes, resp_raw: bytes, frame: int, keep: bool, lines: tuple[bytes, ...]) -> None:
    req = request(req_raw)
    resp = response(resp_raw, req.method)
    assert framing(req, resp, True) == (frame, keep, lines)


def test_framing_never_keeps_what_the_request_would_close() -> None:
    resp = response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert framing(request(GET11), resp, False) == (FRAME_AS_IS, False, ())


# --- heads -------------------------------------------------------------------------------------


def test_local_reply_is_a_whole_response_the_codec_reads_back() -> None:
    data = local_reply(503, b"no healthy upstream", (b"x-a: 1",), False, b"1.1")
    parser = ResponseParser()
    parser.request_sent(b"GET")
    parser.feed(data)
    resp = parser.next_event()
    assert isinstance(resp, Response) and resp.status == 503 and not resp.keep_alive
    assert (b"x-a", b"1") in resp.headers and (b"content-type", b"text/plain") in resp.headers
    body = parser.next_event()
    assert isinstance(body, Data) and body.data == b"no healthy upstream"
    assert isinstance(parser.next_event(), EndOfMessage)
    kept = local_reply(200, b"", (), True, b"1.0")
    assert kept.endswith(b"content-length: 0\r\nconnection: keep-alive\r\n\r\n")


def test_forwarded_request_loses_hop_by_hop_fields_and_gets_the_route_operations() -> None:
    req = request(b"POST /x HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\n"
                  b"te: trailers\r\n"
                  b"expect: 100-continue\r\ntransfer-encoding: chunked\r\nx-secret: s\r\nx-keep: k\r\n\r\n")
    assert wants_continue(req)
    ops = HeaderOps({"remove": ["x-secret"], "add": {"x-added": "1"}})
    lines = forward_fields(req, dict(req.headers), ops, b"b.svc")
    assert lines == [b"x-keep: k", b"host: b.svc", b"x-added: 1"]
    head = forward_head(req, lines, b"/y")
    assert head == (b"POST /y HTTP/1.1\r\nx-keep: k\r\nhost: b.svc\r\nx-added: 1\r\n"
                    b"transfer-encoding: chunked\r\n\r\n")
    no_body = request(b"GET / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\n\r\n")
    assert not wants_continue(no_body)


def test_forwarded_upgrade_request_names_its_upgrade() -> None:
    req = request(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
    head = forward_head(req, forward_fields(req, dict(req.headers), None, req.host), req.target)  # type: ignore[arg-type]
    assert head.endswith(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert head.count(b"upgrade: ") == 1


def test_response_fields_drop_hop_by_hop_and_apply_response_operations() -> None:
    resp = response(b"HTTP/1.1 200 OK\r\nconnection: x-n\r\nx-n: 1\r\nkeep-alive: 5\r\nx-b: 1\r\n"
                    b"content-length: 0\r\n\r\n")
    assert response_fields(resp, None) == [b"x-b: 1", b"content-length: 0"]
    ops = HeaderOps({"set": {"x-b": "2"}, "add": {"x-c": "3"}})
    assert response_fields(resp, ops) == [b"content-length: 0", b"x-b: 2", b"x-c: 3"]


# --- retries -------------------------------------------------------------------------------------


def test_retry_verdicts() -> None:
    retry = RetryPolicy({"attempts": 2, "retry_on": ["5xx", "connect-failure"]})
    assert policy.retry_verdict(retry, True, 0, 503, None) == policy.YES
    assert policy.retry_verdict(retry, True, 0, None, CONNECT_FAILURE) == policy.YES
    assert policy.retry_verdict(retry, True, 0, 404, None) == policy.NO
    assert policy.retry_verdict(retry, False, 0, 503, None) == policy.NO  # the body was too big to keep
    assert policy.retry_verdict(retry, True, 2, 503, None) == policy.EXHAUSTED
    assert policy.retry_verdict(None, True, 0, 503, None) == policy.NO


def test_keep_alive_race_is_retried_once_and_only_for_a_reset_before_any_byte() -> None:
    assert policy.race_retry(RESET, True, False, False, True)
    assert not policy.race_retry(RESET, True, False, True, True)  # once
    assert not policy.race_retry(RESET, True, True, False, True)  # the server had answered something
    assert not policy.race_retry(RESET, False, False, False, True)  # a fresh connection
    assert not policy.race_retry(TIMEOUT, True, False, False, True)


def test_failure_replies() -> None:
    assert policy.failure_reply(TIMEOUT, "") == (504, b"upstream request timeout")
    status, body = policy.failure_reply(CONNECT_FAILURE, "connection_refused")
    assert status == 503 and body.endswith(b"transport failure reason: connection_refused")
    assert policy.failure_reply(RESET, "x")[1].endswith(b"connection termination")


# --- the router's decisions ------------------------------------------------------------------------


def _route(**spec: Any) -> Route:
    return Route({"name": "r", "clusters": [{"name": "c1", "weight": 100}], **spec})


def test_decide_direct_redirect_and_rewrite() -> None:
    req = request(b"GET /old/x HTTP/1.1\r\nhost: a\r\n\r\n")
    direct = _route(direct_response={"status": 418, "body": "tea"}, clusters=[])
    reply = decide(Plan(direct, None, "r"), req, b"a", random.Random(0), {})
    assert reply == LocalReply(418, b"tea", route="r")
    rewritten = _route(match={"uri": {"prefix": "/old"}}, rewrite={"uri": "/new", "authority": "b"})
    fwd = decide(Plan(rewritten, None, "r"), req, b"a", random.Random(0), {})
    assert fwd == Forward("c1", b"/new/x", b"b", None, None, 0)


def test_decide_fault_abort_and_delay() -> None:
    abort = _route(fault={"abort": {"http_status": 503, "percentage": 100}})
    reply = decide(Plan(abort, None, "r"), request(GET11), b"a", random.Random(0), {"c1": "cluster"})
    assert reply == LocalReply(503, b"fault filter abort", flags=("FI",), route="r", cluster="cluster")
    delay = _route(fault={"delay": {"fixed_delay_ms": 50, "percentage": 100}})
    fwd = decide(Plan(delay, None, "r"), request(GET11), b"a", random.Random(0), {})
    assert isinstance(fwd, Forward) and fwd.delay_ms == 50
    both = _route(fault={"delay": {"fixed_delay_ms": 50, "percentage": 100},
                         "abort": {"http_status": 503, "percentage": 100}})
    fwd = decide(Plan(both, None, "r"), request(GET11), b"a", random.Random(0), {})
    assert isinstance(fwd, Forward) and fwd.delay_ms == 50  # Envoy's order: the delay, then the abort
    assert fwd.abort == LocalReply(503, b"fault filter abort", flags=("FI",), route="r")


# --- filters -------------------------------------------------------------------------------------


class _Authz:
    def __init__(self, allow: bool) -> None:
        self.active = True
        self.allow = allow
        self.seen: list[tuple[Any, ...]] = []

    def check_http(self, *args: Any) -> Any:
        self.seen.append(args[:6])
        return SimpleNamespace(allowed=self.allow, audit=None)


def _ctx(raw: bytes, **kw: Any) -> SimpleNamespace:
    req = request(raw)
    base: dict[str, Any] = dict(req=req, hdict=dict(req.headers), authority=req.host, opts=DEFAULT,
                                parser=RequestParser(), rare=False, md=False, peer_md=None,
                                peer=("10.0.0.1", 5), principal="", local=("10.0.0.2", 9080),
                                peer_str="10.0.0.1:5",
                                inbound_cluster="inbound|9080", rt=SimpleNamespace(node_id="n"))
    base.update(kw)
    return SimpleNamespace(**base)


def run_chain(chain: tuple[filters.Filter, ...], ctx: Any) -> LocalReply | None:
    for stage in chain:
        reply = stage(ctx)
        if reply is not None:
            return reply
    return None


def test_authorization_filter_answers_403_and_stops_the_chain() -> None:
    authz = _Authz(allow=False)
    ctx = _ctx(b"GET /admin?x=1 HTTP/1.1\r\nhost: app\r\n\r\n",
               snap=SimpleNamespace(authz=authz, clusters={}))
    reply = run_chain((filters.authorize, filters.route), ctx)
    assert reply is not None and reply.status == 403 and reply.flags == ("RBAC",) and reply.route == "inbound"
    assert authz.seen == [("10.0.0.1", "", 9080, "GET", "/admin?x=1", "app")]
    assert not hasattr(ctx, "plan")  # the router never ran
    allowed = _ctx(GET11, snap=SimpleNamespace(authz=_Authz(allow=True), clusters={}))
    assert filters.authorize(allowed) is None


def test_upgrade_filter_refuses_strips_or_forwards() -> None:
    refused = _ctx(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: foo\r\n\r\n")
    assert filters.upgrade(refused) == LocalReply(403) and refused.rare
    h2c = _ctx(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
    assert filters.upgrade(h2c) is None and h2c.req.upgrade is None
    ws = _ctx(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert filters.upgrade(ws) is None and ws.req.upgrade == b"websocket"


def test_peer_metadata_filter_reads_the_callers_workload() -> None:
    seen: list[bytes] = []

    class Peers:
        def get(self, value: bytes) -> str:
            seen.append(value)
            return "peer"

    ctx = _ctx(b"GET / HTTP/1.1\r\nhost: a\r\nx-envoy-peer-metadata: abc\r\n\r\n",
               state=SimpleNamespace(peers=Peers()))
    assert filters.peer_metadata_in(ctx) is None and ctx.md and ctx.peer_md == "peer" and seen == [b"abc"]


def test_chains_per_direction() -> None:
    assert filters.chain("outbound") == (filters.upgrade, filters.route)
    assert filters.chain("inbound")[-1] is filters.route and filters.authorize in filters.chain("inbound")

