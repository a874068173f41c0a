"""The L4 forwarder: one downstream socket, one upstream connection, bytes both ways.

Each direction is a `pump.Way` (read `src`, write `dst`; the pump shared with the L7
tunnel, see pump.py for how it reads, holds at most one buffer, and applies back-pressure).
Both sockets are registered with the reactor edge-triggered for IN|OUT|RDHUP once, and
never touched with epoll_ctl again. A read of 0 (FIN) is passed on as shutdown(SHUT_WR)
once the way is flushed; when both ways have done so the connection closes. A reset on
either side is passed on as a reset (SO_LINGER 0) on the other.

Copy versus splice, decided by measurement (proxy CPU per request, wrk -c32 through nginx,
medians of interleaved runs, see benchmarks/proxy_l4.py): for a 19-byte body, copying
(readv/write through the reactor's scratch buffer) cost 31.6 us/request against 45.8 us
when always splicing; a short read from a socket proves it is drained, while a splice
into a pipe can stop short when the pipe runs out of slots, so splice has to read until
EAGAIN: one more syscall and a Python exception per event. For a 1 MiB body splice wins
by far: 305 us/request with 256 KiB pipes (349 with 64 KiB, 270 with 1 MiB) against 553
copying, because the pages go socket -> pipe -> socket without passing through Python.
So a way starts in copy mode and switches to splice for good the first time a read
fills the whole scratch buffer (the sender has more queued than one buffer holds).
256 KiB pipes keep the per-direction bound at a quarter of Envoy's 1 MiB buffer limit.

Mutual TLS (tls.py): the downstream may be a `TlsSocket` (inbound, handshaken by the listener), and
`connect(..., tls=(context, allowed_ids))` originates TLS after the TCP connect (outbound): a failed
handshake or a server identity outside `allowed_ids` is an upstream connect failure (UF). A way with
a TLS side reads and writes through OpenSSL (`recv_into`/`send`) instead of the raw fd, and never
splices.

The hot path works on raw fds with os.readv/os.write (no socket-method argument parsing or timeout
bookkeeping) into the reactor's scratch buffer, and keeps no clock: the idle check compares byte
counters instead of stamping every event with the time.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from dataplane.proxy import pump, sockets, tls
from dataplane.proxy.reactor import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor

_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_LINGER_RST = struct.pack("ii", 1, 0)


class Forwarder:
    """Proxy one accepted downstream socket to the upstream given to `connect`; report via `on_close`.

    The downstream is only watched once the upstream has connected: until then its bytes wait
    in the kernel (bounded by the connect timeout), and the same epoll ADD reports them.

    After close, the caller reads (for istio_tcp_* metrics and the access log):
    `bytes_received` (from downstream), `bytes_sent` (to downstream), `connect_time`
    (seconds, None if never connected), `duration`, and `flags`/`detail` — Envoy response
    flags: "" clean, "UF" upstream connect failure (detail `connection_refused`,
    `connect_timeout`, ...), "UC" upstream reset, "DC" downstream reset, "SI" idle timeout,
    or whatever the caller passed to `reject` ("UH", "NR").
    """

    __slots__ = ("_active_at", "_connect_timer", "_idle_timer", "_seen", "closed", "connect_time", "d2u",
                 "detail", "downstream", "downstream_addr", "duration", "flags", "idle_timeout", "mark",
                 "on_close", "on_connected", "orig_dst", "reactor", "splice", "start_time", "started", "tls",
                 "u2d", "upstream", "upstream_addr")

    def __init__(self, reactor: Reactor, downstream: Any, *,
                 on_close: Callable[[Forwarder], Any] | None = None,
                 on_connected: Callable[[Forwarder], Any] | None = None,
                 idle_timeout: float = 3600.0, mark: int = 0, splice: bool = True,
                 downstream_addr: tuple[str, int] | None = None,
                 orig_dst: tuple[str, int] | None = None) -> None:
        """`downstream` (a socket or a tls.TlsSocket) must be non-blocking. `splice=False` keeps both
        halves in copy mode."""
        self.reactor = reactor
        self.downstream = downstream
        self.downstream_addr = downstream_addr
        self.orig_dst = orig_dst
        self.upstream: Any = None
        self.tls: tuple[ssl.SSLContext, frozenset[str]] | None = None
        self.upstream_addr: tuple[str, int] | None = None
        self.on_close = on_close
        self.on_connected = on_connected
        self.idle_timeout = idle_timeout
        self.mark = mark
        self.splice = splice
        self.start_time = time.time()  # wall clock, for access logs
        self.started = time.monotonic()
        self.connect_time: float | None = None
        self.duration = 0.0
        self.flags = ""
        self.detail = ""
        self.closed = False
        self.d2u: pump.Way | None = None
        self.u2d: pump.Way | None = None
        self._connect_timer: Any = None
        self._idle_timer: Any = None
        self._seen = 0
        self._active_at = 0.0

    @property
    def bytes_received(self) -> int:
        return self.d2u.nbytes if self.d2u else 0

    @property
    def bytes_sent(self) -> int:
        return self.u2d.nbytes if self.u2d else 0

    def buffered(self) -> int:
        """Bytes the proxy holds for this connection right now (bounded: one buffer/pipe a way)."""
        return (self.d2u.buffered() if self.d2u else 0) + (self.u2d.buffered() if self.u2d else 0)

    def connect(self, upstream_addr: tuple[str, int], timeout: float = 10.0, *,
                tls: tuple[ssl.SSLContext, frozenset[str]] | None = None) -> None:
        """Start the non-blocking connect; forwarding begins once it completes. `tls`: (client context,
        SPIFFE ids the server may present, empty for any) to originate mutual TLS after the connect."""
        self.upstream_addr = upstream_addr
        self.tls = tls
        sock, err = sockets.connect(upstream_addr, mark=self.mark)
        self.upstream = sock
        if err and err != errno.EINPROGRESS:
            self._close("UF", sockets.errno_name(err))
            return
        self.reactor.register(sock.fileno(), _MASK, self._on_connect_event)
        self._connect_timer = self.reactor.call_later(timeout, self._on_connect_timeout)
        if not err:
            self._on_connect_event(EPOLLOUT)

    def reject(self, flags: str, detail: str = "") -> None:
        """Close the downstream without an upstream (no route, no healthy endpoint)."""
        self._close(flags, detail)

    def _on_connect_event(self, mask: int) -> None:
        sock = self.upstream
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
        if err:
            self._close("UF", sockets.errno_name(err))
            return
        if not mask & EPOLLOUT:
            return  # not connected yet
        if self.tls is not None:
            self._handshake(self.tls[0])
            return
        self._start(mask)

    def _handshake(self, context: ssl.SSLContext) -> None:
        """Originate TLS on the connected upstream, under what is left of the connect timeout."""
        try:
            self.upstream = context.wrap_socket(self.upstream, server_side=False,
                                                do_handshake_on_connect=False)
        except OSError as exc:
            self._close("UF", f"tls_error: {exc}")
            return
        tls.Handshake(self.reactor, self.upstream, self._handshaken, register=False, confirm=True,
                      timeout=max(self._connect_timer.when - time.monotonic(), 0.001))

    def _handshaken(self, sock: tls.TlsSocket | None, reason: str) -> None:
        if self.closed:
            return
        allowed = self.tls[1]  # type: ignore[index]
        if sock is None or not tls.check_identity(sock.principal, allowed):
            reason = reason or "SAN mismatch"
            presented = sock.principal if sock else ""
            tls.log_refused(self.upstream_addr, allowed, presented, reason)  # type: ignore[arg-type]
            self._close("UF", "tls_error: " + reason)
            return
        self.upstream = sock
        if sock.early:  # a server-first greeting's first byte: the fresh downstream takes it at once
            with contextlib.suppress(OSError):
                self.downstream.send(sock.early)
        self._start(EPOLLOUT | EPOLLIN)  # the handshake took the edges: a server-first greeting may wait

    def _start(self, mask: int) -> None:
        """Connected (and handshaken): forward both ways."""
        reactor = self.reactor
        self._connect_timer.cancel()
        self.connect_time = time.monotonic() - self.started
        down, up = self.downstream, self.upstream
        self.d2u = d2u = pump.Way(self, down, up, reactor.scratch, self.splice)
        self.u2d = u2d = pump.Way(self, up, down, reactor.scratch, self.splice)
        d2u.peer, u2d.peer = u2d, d2u
        reactor.set_callback(u2d.src_fd, u2d.on_event)
        reactor.register(d2u.src_fd, _MASK, d2u.on_event)  # ADD reports data already queued
        self._active_at = reactor.now
        self._idle_timer = reactor.call_later(self.idle_timeout / 4, self._check_idle)
        if self.on_connected is not None:
            self.on_connected(self)
        if mask & _IN:
            u2d.on_event(mask)  # a server-first protocol: this edge was its data, and it will not come again

    def _on_connect_timeout(self) -> None:
        self._close("UF", "connect_timeout")

    def _activity(self) -> int:
        d2u, u2d = self.d2u, self.u2d
        return d2u.nbytes + d2u.flushes + u2d.nbytes + u2d.flushes  # type: ignore[union-attr]

    def _check_idle(self) -> None:
        """Runs every quarter of the idle timeout: closes within 1.25x of it, at no per-event cost."""
        if self.closed:
            return
        now = self.reactor.now
        seen = self._activity()
        if seen != self._seen:
            self._seen = seen
            self._active_at = now
        elif now - self._active_at >= self.idle_timeout:
            self._close("SI", "idle_timeout")
            return
        self._idle_timer = self.reactor.call_at(now + self.idle_timeout / 4, self._check_idle)

    def way_ended(self, way: pump.Way) -> None:
        """A way passed its source's FIN on: once the other has too, the connection is over."""
        if way.peer.done:
            self._close("", "")

    def way_failed(self, way: pump.Way, exc: OSError, reading: bool) -> None:
        """A read from the way's source or a write to way.dst failed: reset the other socket too."""
        failed_is_down = (way.dst is self.upstream) == reading
        other = self.upstream if failed_is_down else self.downstream
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)  # type: ignore[union-attr]
        reason = "tls_error" if isinstance(exc, ssl.SSLError) else sockets.errno_name(exc.errno or 0)
        if failed_is_down:
            self._close("DC", "downstream_" + reason)
        else:
            self._close("UC", "upstream_" + reason)

    def _close(self, flags: str, detail: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.flags = flags
        self.detail = detail
        self.duration = time.monotonic() - self.started
        reactor = self.reactor
        for timer in (self._connect_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        for way in (self.d2u, self.u2d):
            if way is not None:
                way.release()
        for sock in (self.downstream, self.upstream):
            if sock is not None:
                reactor.unregister(sock.fileno())
                # closed after this batch of events, so no new socket reuses the fd number
                # while events fetched for the old one are still being dispatched
                reactor.call_soon(sock.close)
        if self.on_close is not None:
            self.on_close(self)
