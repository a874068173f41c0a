"""The L4 path on real loopback sockets: reactor, forwarder and the test harness's
listener (tests/proxy/l4harness.py).

Backends are tiny blocking servers on threads; the proxy runs its reactor on another thread,
so a test talks to it exactly as a workload would. Forwarding is checked in both modes
(splice=True switches to splice on bulk data, splice=False copies through userspace only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dataplane.proxy import pump, sockets
from dataplane.proxy.reactor import EPOLLIN, Reactor
from dataplane.proxy.tcp import Forwarder
from tests.conftest import free_port, wait_for
from tests.proxy.backends import Backend, echo, run_on
from tests.proxy.l4harness import L4Listener

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


class Proxy:
    """A reactor on a thread with L4 listeners; `closed` collects every finished Forwarder."""

    def __init__(self) -> None:
        self.reactor = Reactor()
        self.closed: list[Forwarder] = []
        self.listeners: list[L4Listener] = []
        self.thread: threading.Thread | None = None

    def listen(self, upstream: int | tuple[str, int] | Callable[..., Any], **kw: Any) -> int:
        if callable(upstream):
            choose = upstream
        else:
            target = upstream if isinstance(upstream, tuple) else ("127.0.0.1", upstream)
            choose = lambda _orig, _port: target  # noqa: E731
        sock = sockets.listener("127.0.0.1", 0)
        self.on_loop(lambda: self.listeners.append(
            L4Listener(self.reactor, sock, choose, on_close=self.closed.append, **kw)))
        return sock.getsockname()[1]

    def start(self) -> Proxy:
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()
        return self

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the reactor's thread (or right here before it starts) and return its result."""
        return fn() if self.thread is None else run_on(self.reactor, fn, timeout=5)

    def connections(self) -> list[Forwarder]:
        return self.on_loop(lambda: [c for lst in self.listeners for c in lst.connections])

    def wait_closed(self, n: int = 1, timeout: float = 10.0) -> list[Forwarder]:
        assert wait_for(lambda: len(self.closed) >= n, timeout), f"{len(self.closed)}/{n} closed"
        return self.closed

    def stop(self) -> None:
        self.reactor.stop()
        if self.thread is not None:
            self.thread.join(5)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy().start()
    yield p
    p.stop()


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def make(handler: Callable[[socket.socket], None] = echo, **kw: Any) -> Backend:
        b = Backend(handler, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.close()


def client(port: int, timeout: float = 10.0) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    c.settimeout(timeout)
    return c


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


# -- reactor -------------------------------------------------------------------------------------

def test_reactor_timers_run_in_order_and_cancelled_ones_never() -> None:
    r = Reactor()
    fired: list[str] = []
    r.call_later(0.03, lambda: fired.append("c"))
    r.call_later(0.01, lambda: fired.append("a"))
    r.call_later(0.02, lambda: fired.append("b"))
    r.call_later(0.015, lambda: fired.append("cancelled")).cancel()
    r.call_soon(lambda: fired.append("soon"))
    r.call_later(0.05, r.stop)
    t0 = time.monotonic()
    r.run(duration=2.0)
    assert fired == ["soon", "a", "b", "c"]
    assert time.monotonic() - t0 < 1.0


def test_reactor_compacts_cancelled_timers() -> None:
    r = Reactor()
    for _ in range(2000):
        r.call_later(60, lambda: None).cancel()
    keep = r.call_later(60, lambda: None)
    r.run(duration=0.01)
    assert r.pending_timers() == 1
    assert len(r._timers) < 100  # rebuilt without the cancelled ones
    keep.cancel()


def test_reactor_wakes_from_another_thread_and_survives_a_failing_callback() -> None:
    r = Reactor()
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    got: list[float] = []
    sent = time.monotonic()
    r.call_soon_threadsafe(lambda: 1 / 0)  # logged, the loop carries on
    r.call_soon_threadsafe(lambda: got.append(time.monotonic()))
    assert wait_for(lambda: got, 2.0)
    assert got[0] - sent < 0.5  # woken through the eventfd, not by a poll timeout
    r.stop()
    t.join(2)
    assert not t.is_alive()


def test_reactor_run_is_bounded_by_duration() -> None:
    r = Reactor()
    t0 = time.monotonic()
    r.run(duration=0.1)
    assert 0.09 <= time.monotonic() - t0 < 1.0


def test_reactor_dispatches_fd_events() -> None:
    r = Reactor()
    a, b = socket.socketpair()
    seen: list[int] = []
    r.register(b.fileno(), EPOLLIN, lambda mask: (seen.append(mask), b.recv(10), r.stop()))
    a.send(b"x")
    r.run(duration=2.0)
    assert seen and seen[0] & EPOLLIN
    r.unregister(b.fileno())
    a.close()
    b.close()


# -- sockets -------------------------------------------------------------------------------------

def test_sockets_helpers() -> None:
    assert sockets.parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert sockets.parse_hostport("[::1]:15001") == ("::1", 15001)
    with pytest.raises(ValueError):
        sockets.parse_hostport("nope")
    lst = sockets.listener("127.0.0.1", 0)
    port = lst.getsockname()[1]
    again = sockets.listener("127.0.0.1", port)  # SO_REUSEPORT: a second worker binds the same port
    c = socket.create_connection(("127.0.0.1", port))
    assert wait_for(lambda: _accept_either(lst, again), 2.0)
    served = _accept_either(lst, again)
    assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # inherited from the listener
    assert sockets.original_dst(served) is None  # not redirected: no NAT record
    sock, err = sockets.connect(("127.0.0.1", free_port()))
    assert err in (0, 115)  # EINPROGRESS
    sock.close()
    for s in (c, served, lst, again):
        s.close()


class _NatRecord:
    """Stands in for a redirected socket: answers SO_ORIGINAL_DST with a packed sockaddr."""

    def __init__(self, family: socket.AddressFamily, raw: bytes) -> None:
        self.family = family
        self.raw = raw
        self.asked: tuple[int, int, int] | None = None

    def getsockopt(self, level: int, opt: int, size: int) -> bytes:
        self.asked = (level, opt, size)
        return self.raw


def test_original_dst_parses_both_families() -> None:
    v4 = _NatRecord(socket.AF_INET, struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9080)
                    + socket.inet_aton("10.1.2.3") + bytes(8))
    assert sockets.original_dst(v4) == ("10.1.2.3", 9080)  # type: ignore[arg-type]
    assert v4.asked == (socket.SOL_IP, 80, 16)
    v6 = _NatRecord(socket.AF_INET6, struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0)
                    + socket.inet_pton(socket.AF_INET6, "fd00::7") + bytes(4))
    assert sockets.original_dst(v6) == ("fd00::7", 443)  # type: ignore[arg-type]
    assert v6.asked == (sockets.SOL_IPV6, 80, 28)


_accepted: dict[int, socket.socket] = {}


def _accept_either(*listeners: socket.socket) -> Any:
    for lst in listeners:
        if lst.fileno() in _accepted:
            return _accepted[lst.fileno()]
        with contextlib.suppress(BlockingIOError):
            s, _ = lst.accept()
            _accepted[lst.fileno()] = s
            return s
    return None


# -- forwarding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("splice", MODES)
def test_echo_through_the_proxy(proxy: Proxy, backends: Callable[..., Backend], splice: bool) -> None:
    port = proxy.listen(backends().port, splice=splice)
    with client(port) as c:
        for i in range(20):
            msg = f"hello {i}".encode()
            c.sendall(msg)
            assert c.recv(100) == msg
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == "" and fwd.detail == ""
    assert fwd.bytes_received == fwd.bytes_sent == sum(len(f"hello {i}") for i in range(20))
    assert fwd.connect_time is not None and 0 <= fwd.connect_time < 1
    assert fwd.upstream_addr == ("127.0.0.1", proxy.listeners[0].choose_upstream(None, 0)[1])


@pytest.mark.parametrize("splice", MODES)
def test_8mib_both_directions_with_checksums(proxy: Proxy, backends: Callable[..., Backend],
                                             splice: bool) -> None:
    port = proxy.listen(backends().port, splice=splice)
    data = os.urandom(8 << 20)
    with client(port) as c:
        def send() -> None:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        got = read_all(c)
        sender.join(10)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == ""
    assert fwd.bytes_received == fwd.bytes_sent == len(data)
    pumps = {fwd.d2u.pump.__name__, fwd.u2d.pump.__name__}  # type: ignore[union-attr]
    assert pumps == ({"_pump_splice"} if splice else {"_pump_copy"})


def test_half_close_client_still_gets_the_reply(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    def digest_after_eof(conn: socket.socket) -> None:
        h = hashlib.sha256()
        while data := conn.recv(1 << 16):
            h.update(data)
        time.sleep(0.1)  # the reply comes well after the client's FIN went through
        conn.sendall(h.hexdigest().encode())

    port = proxy.listen(backends(digest_after_eof).port)
    payload = os.urandom(300_000)
    with client(port) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert read_all(c) == hashlib.sha256(payload).hexdigest().encode()
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == "" and fwd.bytes_received == len(payload) and fwd.bytes_sent == 64


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest.mark.parametrize("splice", MODES)
def test_backend_reset_mid_stream_resets_the_client(proxy: Proxy, backends: Callable[..., Backend],
                                                    splice: bool) -> None:
    def send_then_reset(conn: socket.socket) -> None:
        conn.sendall(os.urandom(1 << 20))
        conn.recv(1)  # wait for the client's go
        _rst(conn)

    port = proxy.listen(backends(send_then_reset).port, splice=splice)
    with client(port) as c:
        got = 0
        while got < 1 << 20:
            got += len(c.recv(1 << 20))
        c.sendall(b"!")
        with pytest.raises(ConnectionResetError):
            while c.recv(1 << 16):
                pass
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == "UC" and fwd.detail == "upstream_connection_reset"


def test_client_reset_resets_the_backend(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    outcome: list[str] = []

    def wait_for_reset(conn: socket.socket) -> None:
        try:
            conn.sendall(b"hi")
            outcome.append("eof" if conn.recv(10) == b"" else "data")
        except ConnectionResetError:
            outcome.append("reset")

    port = proxy.listen(backends(wait_for_reset).port)
    c = client(port)
    assert c.recv(2) == b"hi"
    _rst(c)
    assert wait_for(lambda: outcome, 5.0)
    assert outcome == ["reset"]
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == "DC" and fwd.detail == "downstream_connection_reset"


def test_connect_refused_closes_the_client_as_UF(proxy: Proxy) -> None:
    port = proxy.listen(free_port())
    with client(port) as c:
        assert c.recv(10) == b""
    (fwd,) = proxy.wait_closed()
    assert (fwd.flags, fwd.detail) == ("UF", "connection_refused")
    assert fwd.connect_time is None and fwd.bytes_received == fwd.bytes_sent == 0


def test_connect_timeout_closes_the_client_as_UF(proxy: Proxy) -> None:
    # a listener that never accepts, with its accept queue full: Linux drops further SYNs,
    # so a connect to it stays in SYN_SENT (all on loopback)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=2)
    try:
        port = proxy.listen(full.getsockname(), connect_timeout=0.3)
        t0 = time.monotonic()
        with client(port) as c:
            assert c.recv(10) == b""
        assert 0.25 <= time.monotonic() - t0 < 3.0
        (fwd,) = proxy.wait_closed()
        assert (fwd.flags, fwd.detail) == ("UF", "connect_timeout")
        assert proxy.reactor.pending_timers() == 0
    finally:
        filler.close()
        full.close()


def test_no_upstream_is_reported_with_the_callers_flag(proxy: Proxy) -> None:
    port = proxy.listen(lambda _orig, _port: "NR")
    with client(port) as c:
        assert c.recv(10) == b""
    port = proxy.listen(lambda _orig, _port: None)
    with client(port) as c:
        assert c.recv(10) == b""
    assert [f.flags for f in proxy.wait_closed(2)] == ["NR", "UH"]


@pytest.mark.parametrize("splice", MODES)
def test_backpressure_keeps_the_proxy_buffer_bounded(proxy: Proxy, backends: Callable[..., Backend],
                                                     splice: bool) -> None:
    stop = threading.Event()
    sent = [0]
    chunk = os.urandom(1 << 16)

    def flood(conn: socket.socket) -> None:
        conn.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                sent[0] += conn.send(chunk)
        conn.shutdown(socket.SHUT_WR)

    port = proxy.listen(backends(flood).port, splice=splice)
    bound = max(pump.PIPE_SIZE, len(proxy.reactor.scratch))  # one buffer for the one busy direction
    with client(port) as c:
        assert wait_for(lambda: proxy.connections(), 5.0)
        (fwd,) = proxy.connections()
        peak = 0
        deadline = time.monotonic() + 1.5
        stalled_at = None
        while time.monotonic() < deadline:  # the client reads nothing
            peak = max(peak, fwd.buffered())
            if stalled_at is None and time.monotonic() > deadline - 0.5:
                stalled_at = sent[0]
            time.sleep(0.01)
        assert 0 < peak <= bound
        assert sent[0] == stalled_at, "the backend kept sending into a client that reads nothing"
        assert sent[0] < 80 << 20  # kernel socket buffers only: the proxy took in no more
        stop.set()
        assert len(read_all(c)) == sent[0]
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == "" and fwd.bytes_sent == sent[0]


def test_idle_timeout_closes(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    port = proxy.listen(backends().port, idle_timeout=0.5)
    with client(port) as c:
        c.sendall(b"ping")
        assert c.recv(10) == b"ping"
        t0 = time.monotonic()
        assert c.recv(10) == b""
        assert 0.4 <= time.monotonic() - t0 < 3.0
    (fwd,) = proxy.wait_closed()
    assert (fwd.flags, fwd.detail) == ("SI", "idle_timeout")


def test_activity_keeps_an_idle_timeout_away(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    port = proxy.listen(backends().port, idle_timeout=0.5)
    with client(port) as c:
        for _ in range(20):  # 1 s of traffic, twice the idle timeout
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            time.sleep(0.05)
    (fwd,) = proxy.wait_closed()
    assert fwd.flags == ""


def test_200_concurrent_connections(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    port = proxy.listen(backends().port)
    conns = [client(port) for _ in range(200)]
    try:
        for i, c in enumerate(conns):
            c.sendall(f"conn {i}".encode())
        for i, c in enumerate(conns):
            assert c.recv(100) == f"conn {i}".encode()
        assert len(proxy.connections()) == 200
    finally:
        for c in conns:
            c.close()
    closed = proxy.wait_closed(200)
    assert all(f.flags == "" for f in closed)
    assert wait_for(lambda: not proxy.connections(), 5.0)
