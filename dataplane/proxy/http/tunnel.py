"""The tunnel after a protocol switch (a 101 to an allowed Upgrade, or a CONNECT 2xx): bytes both
ways between the client and the upstream connection, no longer HTTP, until either side is done.

It borrows its owner's (server.HttpConnection's) client socket, pending writes and accounting: the
upgraded request is accounted, and both connections closed, when the tunnel ends.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dataplane.proxy.http.codec import TunnelData
from dataplane.proxy.http.upstream import UpstreamConn
from dataplane.proxy.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

if TYPE_CHECKING:
    from dataplane.proxy.http.server import HttpConnection

_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR


class Tunnel:
    """Bytes both ways after a 101 (or a CONNECT 2xx), under the same back-pressure rule: a way
    holds at most one read while its destination is full."""

    __slots__ = ("conn", "down", "owner", "read_size", "up")

    def __init__(self, owner: HttpConnection, conn: UpstreamConn, read_size: int) -> None:
        self.owner = owner
        self.conn = conn
        self.read_size = read_size
        reactor = owner.reactor
        owner.parser.start_tunnel()
        self.down = Way(owner.d_read, conn.sock, conn.write)  # client -> upstream
        self.up = Way(conn.read, owner.sock, owner.d_write)  # upstream -> client
        leftover_up = drain(conn.parser)
        leftover_down = drain(owner.parser)
        reactor.set_callback(owner.fd, self._on_down)
        reactor.set_callback(conn.fd, self._on_up)
        if leftover_up:
            self.up.moved += len(leftover_up)
            owner._send_down(leftover_up)  # behind the 101 head, which may still be pending
        try:
            if leftover_down:
                self.down.send(leftover_down)
        except OSError:
            self.close()
            return
        # unread bytes may wait in either kernel buffer, and their edges have passed
        self.down.readable = self.up.readable = True
        self.pump()

    def _on_down(self, mask: int) -> None:
        owner = self.owner
        try:
            if mask & EPOLLOUT:
                if owner.d_pending:
                    owner._flush_down()  # resumes the tunnel when done
                elif self.up.pending:
                    self.up.flush()
            if mask & _IN:
                self.down.readable = True
        except OSError:
            self.close()
            return
        self.pump()

    def _on_up(self, mask: int) -> None:
        try:
            if mask & EPOLLOUT and self.down.pending:
                self.down.flush()
            if mask & _IN:
                self.up.readable = True
        except OSError:
            self.close()
            return
        self.pump()

    def resume_up(self) -> None:
        self.pump()

    def pump(self) -> None:
        owner = self.owner
        if owner.tunnel is not self:
            return
        try:
            if not owner.d_pending:
                self.up.move(self.read_size)
            self.down.move(self.read_size)
        except OSError:
            self.close()
            return
        owner.last = owner.reactor.now
        if self.down.done and self.up.done:
            self.close()

    def close(self) -> None:
        """Either side is done or broken: account the upgraded request and close both."""
        owner = self.owner
        if owner.tunnel is not self:
            return
        owner.req_bytes += self.down.moved
        owner.resp_bytes += self.up.moved
        owner._account()
        owner.close()  # closes self.conn too


class Way:
    """One direction of a tunnel: `read` the source, `write` to `dst` (plain or TLS, see tls.io_funcs)."""

    __slots__ = ("done", "dst", "eof", "moved", "pending", "read", "readable", "write")

    def __init__(self, read: Callable[[int], bytes], dst: Any, write: Callable[[Any], int]) -> None:
        self.read = read
        self.dst = dst
        self.write = write
        self.pending = b""
        self.readable = self.eof = self.done = False
        self.moved = 0

    def send(self, data: bytes) -> None:
        self.moved += len(data)
        try:
            n = self.write(data)
        except BlockingIOError:
            n = 0
        self.pending = data[n:]

    def flush(self) -> None:
        try:
            n = self.write(self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[n:]
        if not self.pending and self.eof:
            self._finish()

    def move(self, size: int) -> None:
        while self.readable and not self.pending and not self.eof:
            try:
                data = self.read(size)
            except BlockingIOError:
                self.readable = False
                return
            if not data:
                self.eof = True
                self.readable = False
                self._finish()
                return
            self.send(data)
            if len(data) < size:
                self.readable = False

    def _finish(self) -> None:
        """The source said FIN and all is written: pass the FIN on."""
        if not self.pending and not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)


def drain(parser: Any) -> bytes:
    """What a parser switched to tunnel mode still buffers."""
    out = []
    while True:
        ev = parser.next_event()
        if ev.__class__ is not TunnelData:
            return b"".join(out)
        out.append(ev.data)
