"""The tunnel after a protocol switch (a 101 to an allowed Upgrade, or a CONNECT 2xx): bytes both
ways between the client and the upstream connection, no longer HTTP, until both sides are done.

Each direction is a `pump.Way`, the pump the L4 forwarder uses (copy mode: reads into the reactor's
scratch buffer, holds at most one read while its destination is full, passes a FIN on as
shutdown(SHUT_WR), TLS on either side through OpenSSL). It borrows its owner's
(server.HttpConnection's) client socket, pending writes and accounting: the upgraded request is
accounted, and both connections closed, when the tunnel ends or either side fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dataplane.proxy import pump
from dataplane.proxy.http.codec import TunnelData
from dataplane.proxy.http.upstream import UpstreamConn
from dataplane.proxy.reactor import EPOLLOUT

if TYPE_CHECKING:
    from dataplane.proxy.http.server import HttpConnection


class Tunnel:
    """Bytes both ways after a 101 (or a CONNECT 2xx). The upstream's bytes wait until the client
    has the 101 head (queued in the owner's `d_pending`): `resume_up` is called once it is written."""

    __slots__ = ("conn", "down", "owner", "up")

    def __init__(self, owner: HttpConnection, conn: UpstreamConn, read_size: int) -> None:
        self.owner = owner
        self.conn = conn
        owner.tunnel = self
        reactor = owner.reactor
        owner.parser.start_tunnel()
        buf = reactor.scratch_view[:read_size]
        self.down = down = pump.Way(self, owner.sock, conn.sock, buf)  # client -> upstream
        self.up = up = pump.Way(self, conn.sock, owner.sock, buf)  # upstream -> client
        down.peer, up.peer = up, down
        leftover_up = drain(conn.parser)
        leftover_down = drain(owner.parser)
        reactor.set_callback(owner.fd, self._on_down)
        reactor.set_callback(conn.fd, self._on_up)
        if leftover_up:
            up.nbytes += len(leftover_up)
            owner._send_down(leftover_up)  # behind the 101 head, which may still be pending
        if leftover_down:
            down.send(leftover_down)
        if owner.tunnel is not self:
            return  # the send failed
        up.halted = bool(owner.d_pending)  # upstream bytes only behind the head
        # unread bytes may wait in either kernel buffer, and their edges have passed
        if not down.halted:
            down.pump()
        if not up.halted and owner.tunnel is self:
            up.pump()

    def _on_down(self, mask: int) -> None:
        """Events of the client's socket."""
        owner = self.owner
        if mask & EPOLLOUT and owner.d_pending:
            owner._flush_down()  # the 101 head (and what came with it): resumes the upstream way
        if owner.tunnel is self:
            self.down.on_event(mask)
        owner.last = owner.reactor.now

    def _on_up(self, mask: int) -> None:
        """Events of the upstream connection's socket."""
        self.up.on_event(mask)
        self.owner.last = self.owner.reactor.now

    def resume_up(self) -> None:
        """The client has everything the owner queued: the upstream's bytes may follow."""
        up = self.up
        if up.halted and not up.eof and not up.blocked:
            up.halted = False
            up.pump()

    def way_ended(self, way: pump.Way) -> None:
        if way.peer.done:
            self.close()

    def way_failed(self, way: pump.Way, exc: OSError, reading: bool) -> None:
        self.close()

    def close(self) -> None:
        """Both sides are done, or one is broken: account the upgraded request and close both."""
        owner = self.owner
        if owner.tunnel is not self:
            return
        owner.req_bytes += self.down.nbytes
        owner.resp_bytes += self.up.nbytes
        self.down.release()
        self.up.release()
        owner._account()
        owner.close()  # closes self.conn too


def drain(parser: Any) -> bytes:
    """What a parser switched to tunnel mode still buffers."""
    out = []
    while True:
        ev = parser.next_event()
        if ev.__class__ is not TunnelData:
            return b"".join(out)
        out.append(ev.data)
