"""Clients that stop in the middle of a request, on real sockets through the real engine.

A request whose body stops arriving gets 408 "stream timeout" (flag SI) after the listener's
`stream_idle_timeout`, its upstream connection is closed (it is mid-request: never pooled); a
chunked body with a bare LF fails at once with 400 (flag DPE), both sides closed. The timeouts are
made small here; no assert is about how fast anything happened.

`test_reference_peers_end_every_vector` sends the same bytes to zmesh, HAProxy and nginx (10 s
timeouts) at once and prints the table: vector | zmesh | HAProxy | nginx. Both peers accept a bare
LF as a chunk line end (200); zmesh refuses it, as RFC 9112 lets it and its smuggling defences want.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dataplane.proxy.http.codec import HTTPError, RequestParser
from dataplane.proxy.http.options import DEFAULT, HttpOptions, http_options
from dataplane.proxy.runtime import ConfigError, compile_snapshot
from tests.conftest import wait_for
from tests.proxy.backends import Backend as TcpBackend
from tests.proxy.l7helpers import CLUSTER, Backend, Client, Proxy, endpoint, make_config
from tests.proxy.reference_peers import HAPROXY_TIMEOUT_S, Outcome, RecordingBackend, exchange, haproxy, nginx

SERVICE = "svc.default.svc.cluster.local"
FAST = HttpOptions(request_headers_timeout=0.3, stream_idle_timeout=0.3)

HEAD_CL = b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n"
HEAD_CHUNKED = b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
VECTORS = {
    "stalled Content-Length body (100 announced, 5 sent)": HEAD_CL + b"hello",
    "stalled chunked body (mid-chunk)": HEAD_CHUNKED + b"64\r\nhello",
    "bare LF in a chunk size line": HEAD_CHUNKED + b"5\nhello\n0\n\n",
    "bare LF after chunk data": HEAD_CHUNKED + b"5\r\nhello\n",
    "stalled head": b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: a",
}


class Sink(TcpBackend):
    """An upstream that never answers: it records what each connection carried and whether the
    proxy closed it."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.ended = 0
        super().__init__(self._record)

    def _record(self, conn: socket.socket) -> None:
        index = len(self.got)
        self.got.append(b"")
        while data := conn.recv(65536):
            self.got[index] += data
        self.ended += 1


class EarlyAnswer(TcpBackend):
    """An upstream that answers part of a response as soon as the request head is in, then waits."""

    def __init__(self) -> None:
        self.ended = 0
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf and (data := conn.recv(65536)):
            buf += data
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
        while conn.recv(65536):
            pass
        self.ended += 1


@contextlib.contextmanager
def proxy_to(port: int, options: HttpOptions = DEFAULT) -> Iterator[Proxy]:
    """A sidecar's outbound HTTP listener (these options) routing everything to 127.0.0.1:`port`."""
    proxy = Proxy(make_config(endpoints={CLUSTER: [endpoint(port)]}), options=options)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    backend = Sink()
    yield backend
    backend.close()


def test_a_stalled_body_gets_408_and_the_upstream_connection_is_closed(sink: Sink) -> None:
    with proxy_to(sink.port, FAST) as proxy:
        c = Client(proxy.port)
        c.send(VECTORS["stalled Content-Length body (100 announced, 5 sent)"])
        r = c.response("POST")
        assert (r.status, r.body, r.headers[b"connection"]) == (408, b"stream timeout", b"close")
        assert c.closed()
        assert wait_for(lambda: sink.ended == 1)
        assert sink.got[0].startswith(b"POST /upload HTTP/1.1\r\n") and sink.got[0].endswith(b"\r\n\r\nhello")
        assert wait_for(lambda: proxy.requests().get((SERVICE, "408", "SI")) == 1)
        assert ['"response_flags":"SI"' in line for line in proxy.log_lines()] == [True]
        assert [(p["open"], p["idle"]) for p in proxy.pools()] == [(0, 0)]  # closed, not pooled


def test_a_stalled_chunked_body_gets_408_too(sink: Sink) -> None:
    with proxy_to(sink.port, FAST) as proxy:
        c = Client(proxy.port)
        c.send(VECTORS["stalled chunked body (mid-chunk)"])
        assert c.response("POST").status == 408
        assert c.closed() and wait_for(lambda: sink.ended == 1)
        assert b"\r\n\r\n5\r\nhello\r\n" in sink.got[0]  # the chunk so far was forwarded


def test_a_slow_body_that_keeps_coming_is_not_cut() -> None:
    with contextlib.ExitStack() as stack:
        app = Backend(lambda _c, seen: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (
            len(seen.body), seen.body))
        stack.callback(app.close)
        proxy = stack.enter_context(proxy_to(app.port, HttpOptions(stream_idle_timeout=1.5)))
        c = Client(proxy.port)
        c.send(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 12\r\n\r\n")
        for _ in range(12):  # 12 pauses of 0.15 s: longer in all than the timeout, none near it
            time.sleep(0.15)
            c.send(b"x")
        r = c.response("POST")
        assert (r.status, r.body) == (200, b"x" * 12)


def test_a_response_already_started_is_cut_and_both_sides_closed() -> None:
    backend = EarlyAnswer()
    try:
        with proxy_to(backend.port, FAST) as proxy:
            c = Client(proxy.port)
            c.send(HEAD_CL + b"hello")
            c.sock.settimeout(5)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while data := c.sock.recv(65536):
                    got += data
            assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"partial")  # then the close
            assert wait_for(lambda: backend.ended == 1)
            assert wait_for(lambda: proxy.requests().get((SERVICE, "200", "SI")) == 1)
    finally:
        backend.close()


@pytest.mark.parametrize("vector", ["bare LF in a chunk size line", "bare LF after chunk data"])
def test_a_bare_lf_in_chunk_framing_is_400_at_once_on_both_sides(sink: Sink, vector: str) -> None:
    # the default stream idle timeout (60 s): an answer can only come from the framing error
    with proxy_to(sink.port) as proxy:
        c = Client(proxy.port, timeout=20)
        c.send(HEAD_CHUNKED)  # the head goes upstream first, then the bad framing follows
        assert wait_for(lambda: sink.got and sink.got[0].endswith(b"\r\n\r\n"))
        c.send(VECTORS[vector][len(HEAD_CHUNKED):])
        r = c.response("POST")
        assert r.status == 400 and r.headers[b"connection"] == b"close"
        assert c.closed() and wait_for(lambda: sink.ended == 1)
        assert wait_for(lambda: proxy.requests().get((SERVICE, "400", "DPE")) == 1)


@pytest.mark.parametrize("vector", ["bare LF in a chunk size line", "bare LF after chunk data"])
def test_the_codec_fails_a_bare_lf_in_chunk_framing_without_waiting(vector: str) -> None:
    parser = RequestParser()
    parser.feed(VECTORS[vector])  # nothing more will come: the error must not need more bytes
    with pytest.raises(HTTPError) as err:
        for _ in range(5):
            parser.next_event()
    assert err.value.status == 400 and "LF" in err.value.reason  # "bare LF ...", "... not followed by CRLF"


def test_options_come_from_the_listener_and_bad_ones_are_nacked() -> None:
    opts = http_options({"request_headers_timeout_ms": 2000, "stream_idle_timeout_ms": 0,
                         "upgrade_types": ["WebSocket", "CONNECT"]})
    assert opts.request_headers_timeout == 2.0 and opts.stream_idle_timeout == float("inf")
    assert opts.upgrade_types == {b"websocket", b"connect"} and opts.idle_timeout == 3600.0
    assert http_options(None) == HttpOptions()
    for bad, word in (({"stream_idle_timeout_ms": -1}, "stream_idle_timeout_ms"), ({"stream_idle_timeout": 5},
                      "unknown"), ({"upgrade_types": "websocket"}, "upgrade_types")):
        cfg = make_config()
        cfg["listeners"]["outbound"] = [{"name": "svc_80", "service": "svc", "port": 80, "protocol": "HTTP",
                                         "route_config": "80", "http": bad}]
        with pytest.raises(ConfigError, match=word):
            compile_snapshot(cfg)


# --- the same bytes through HAProxy and nginx -----------------------------------------------------

@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Outcome]:
    """Every vector to zmesh, HAProxy and nginx at once (each peer behind its own recording backend):
    one wait for the peers' 10 s timeouts, whatever the number of vectors."""
    with contextlib.ExitStack() as stack:
        peers: dict[str, tuple[int, RecordingBackend]] = {}
        for name, start in (("HAProxy", haproxy), ("nginx", nginx)):
            backend = RecordingBackend()
            stack.callback(backend.close)
            tmp: Path = tmp_path_factory.mktemp(name)
            peers[name] = (stack.enter_context(start(tmp, backend.port)), backend)
        backend = RecordingBackend()
        stack.callback(backend.close)
        peers["zmesh"] = (stack.enter_context(proxy_to(backend.port, FAST)).port, backend)
        with ThreadPoolExecutor(len(VECTORS) * len(peers)) as pool:
            futures = {(vector, name): pool.submit(exchange, port, data, timeout=HAPROXY_TIMEOUT_S + 2,
                                                   peer=name)
                       for vector, data in VECTORS.items() for name, (port, _b) in peers.items()}
            return {key: f.result() for key, f in futures.items()}


def test_reference_peers_end_every_vector(outcomes: dict[tuple[str, str], Outcome]) -> None:
    print("\nvector | zmesh | HAProxy | nginx")
    for vector in VECTORS:
        row = [outcomes[vector, peer] for peer in ("zmesh", "HAProxy", "nginx")]
        print(" | ".join([vector, *(_cell(o) for o in row)]))
    for vector in VECTORS:
        ours = outcomes[vector, "zmesh"]
        assert ours.closed and ours.statuses() in ([400], [408]), (vector, ours.summary())
        for peer in ("HAProxy", "nginx"):  # what the table rests on: each peer answered or closed
            theirs = outcomes[vector, peer]
            assert theirs.closed or theirs.statuses(), (vector, theirs.summary())


def _cell(o: Outcome) -> str:
    codes = ",".join(map(str, o.statuses())) or "no answer"
    return f"{codes}, {'closed' if o.closed else 'open'} after {o.seconds:.1f}s"
