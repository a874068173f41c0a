"""An idle pooled upstream connection (dataplane/proxy/http/upstream.py) is closed when the server
closes it, and only then: the kernel's EPOLLOUT edge when the server's ACKs free send buffer comes
after the request went out, often once the connection is back in the pool. Closing on it made the
bookinfo mesh open a new (mTLS) connection for about one request in five. Real sockets, a real
reactor, the kernel's own edges."""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterator

import pytest

from dataplane.proxy.http.upstream import UpstreamConn, Upstreams
from dataplane.proxy.reactor import EPOLLET, EPOLLOUT, Reactor
from tests.conftest import wait_for
from tests.proxy.test_cluster import endpoint_specs, make


class Owner:
    """The owner side of the pool protocol, recording what it is told."""

    def __init__(self) -> None:
        self.connected: UpstreamConn | None = None
        self.failed = ""

    def upstream_connected(self, conn: UpstreamConn) -> None:
        self.connected = conn

    def upstream_failed(self, conn: UpstreamConn, detail: str) -> None:
        self.failed = detail

    def upstream_ready(self, conn: UpstreamConn) -> None:
        raise AssertionError("nobody waits in this test")


def spin(reactor: Reactor, cond: object) -> bool:
    """Run `reactor` a little at a time until `cond()` holds (bounded)."""
    def step() -> object:
        reactor.run(duration=0.01)
        return cond()  # type: ignore[operator]
    return wait_for(step, timeout=10)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: the send side fills soon
    yield srv
    srv.close()


def test_idle_connection_outlives_epollout_and_closes_with_the_server(server: socket.socket) -> None:
    reactor = Reactor()
    ups = Upstreams(reactor)
    cluster = make(1, endpoints=endpoint_specs(1, address="127.0.0.1", port=server.getsockname()[1]))
    pool = ups.pool(cluster, cluster.endpoints[0])
    owner = Owner()
    conn = ups.acquire(pool, owner)
    assert isinstance(conn, UpstreamConn)
    assert spin(reactor, lambda: owner.connected is conn or owner.failed), owner.failed
    peer, _ = server.accept()
    watch = select.epoll()
    try:
        # a request bigger than the kernel takes at once: the send buffer fills (EAGAIN), so the
        # server's reading it frees space later, with an EPOLLOUT edge, as ACKs do in the mesh
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        for _ in range(10_000):
            try:
                sent += conn.write(b"x" * 65536)
            except BlockingIOError:
                break
        else:
            pytest.fail("the send buffer never filled")
        ups.release(conn, True)
        assert pool.idle == [conn]
        watch.register(conn.fd, EPOLLOUT | EPOLLET)  # not writable now: no edge until space frees
        got = 0
        peer.settimeout(5)
        while got < sent:
            data = peer.recv(1 << 20)
            assert data, "the connection closed under the server"
            got += len(data)
        assert wait_for(lambda: watch.poll(0.05), timeout=10), "the kernel gave no EPOLLOUT edge"
        reactor.run(duration=0)  # the same edge, on the pool's reactor
        assert pool.idle == [conn] and not conn.closed and pool.open == 1
        peer.close()  # the server closes: now the idle connection goes
        assert spin(reactor, lambda: conn.closed)
        assert pool.idle == [] and pool.open == 0
    finally:
        watch.close()
        with contextlib.suppress(OSError):
            peer.close()
        ups.close_all()
        reactor.run(duration=0)
        reactor.close()
