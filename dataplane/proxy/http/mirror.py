"""Envoy's request mirroring: a fire-and-forget copy of a request to each sampled mirror cluster,
Host suffixed "-shadow"; its response is read and dropped, its failure only reported to the
cluster (outlier detection). A mirror never waits for a connection and never buffers for a
slow peer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dataplane.proxy import routing
from dataplane.proxy.cluster import CONNECT_FAILURE, RESET, TIMEOUT, Cluster
from dataplane.proxy.http.codec import CLOSED, NEED_DATA, EndOfMessage, HTTPError, Response
from dataplane.proxy.http.upstream import PENDING, UpstreamConn
from dataplane.proxy.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLRDHUP, Timer

READ_SIZE = 65536
SHADOW_TIMEOUT = 15.0  # a mirrored request without a route timeout gives up after this
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR


def mirror(state: Any, mirrors: Iterable[routing.Mirror], clusters: Mapping[str, Cluster], rng: Any,
           method: bytes, head: bytes, body: Iterable[bytes], timeout: float) -> None:
    """Send the request (`head` as forwarded, its kept `body`) to every sampled mirror."""
    data = None
    for m in mirrors:
        if not m.sampled(rng.random()):
            continue
        cluster = clusters.get(m.cluster)
        if cluster is None:
            continue
        if data is None:
            data = b"".join([shadow_head(head), *body])
        Shadow(state, cluster, method, data, timeout or SHADOW_TIMEOUT)


def shadow_head(head: bytes) -> bytes:
    """`head` with its Host value suffixed "-shadow" (before a port), as Envoy's mirror policy does."""
    start = head.find(b"\r\nhost: ") + 8
    end = head.find(b"\r\n", start)
    host = head[start:end]
    name, colon, port = host.rpartition(b":")
    shadow = name + b"-shadow:" + port if colon and port.isdigit() else host + b"-shadow"
    return head[:start] + shadow + head[end:]


class Shadow:
    """One mirrored request: sent on the mirror cluster's pool, its response read and dropped."""

    __slots__ = ("cluster", "conn", "data", "ep", "keep", "method", "state", "timer")

    def __init__(self, state: Any, cluster: Cluster, method: bytes, data: bytes,
                 timeout: float) -> None:
        self.state = state
        self.cluster = cluster
        self.method = method
        self.data = data
        self.conn: UpstreamConn | None = None
        self.timer: Timer | None = None
        self.keep = False
        self.ep = ep = cluster.pick()
        if ep is None:
            return
        ups = state.upstreams
        pool = ups.pool(cluster, ep)
        conn = ups.acquire(pool, self)
        if conn is PENDING:  # a mirror never waits for a connection
            ups.cancel(pool, self)
        if isinstance(conn, str):  # PENDING, OVERFLOW or BLACKHOLED
            self.ep = None
            return
        cluster.start(ep)
        self.timer = state.reactor.call_later(timeout, lambda: self._done(TIMEOUT))
        self.upstream_ready(conn)

    def upstream_ready(self, conn: UpstreamConn) -> None:
        self.conn = conn
        conn.parser.request_sent(self.method)
        if conn.connected:
            self.upstream_connected(conn)

    def upstream_connected(self, conn: UpstreamConn) -> None:
        self.state.reactor.set_callback(conn.fd, self._on_event)
        try:
            n = conn.write(self.data)
        except OSError:
            n = -1
        if n != len(self.data):  # best effort: no buffering for a slow mirror
            self._done(RESET)

    def upstream_failed(self, conn: UpstreamConn, detail: str) -> None:
        self.conn = None
        self._done(CONNECT_FAILURE)

    def _on_event(self, mask: int) -> None:
        conn = self.conn
        if conn is None or not mask & _IN:
            return
        parser = conn.parser
        while self.conn is not None:
            try:
                data = conn.read(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
            try:
                while True:
                    ev = parser.next_event()
                    if ev.__class__ is Response:
                        self.keep = ev.keep_alive
                    elif ev.__class__ is EndOfMessage:
                        self._done(None)
                        return
                    elif ev is NEED_DATA:
                        break
                    elif ev is CLOSED:
                        self._done(RESET)
                        return
            except HTTPError:
                self._done(RESET)
                return
            if not data:
                return

    def _done(self, failure: str | None) -> None:
        conn, self.conn = self.conn, None
        ups = self.state.upstreams
        if conn is not None:
            if failure is None:
                ups.release(conn, self.keep)
            else:
                ups.close(conn)
        if self.ep is not None:
            self.cluster.finish(self.ep, self.state.reactor.now * 1000, failure=failure)
            self.ep = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
