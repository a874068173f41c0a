"""Accepting connections on a listening socket, shared by every listener kind.

The listening socket is level-triggered and each readiness event accepts at most BATCH
connections, so an accept storm cannot starve connections already being served; what is
left stays readable for the next turn. Out of file descriptors, it pauses for a moment
instead of spinning on a socket that stays readable.

With a `ConnectionLimit` (connlimit.py, shared by a worker's acceptors) a connection past the
worker's bound is closed as soon as it is accepted, before anything reads it.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from bus.logs import Log
from dataplane.proxy.connlimit import ConnectionLimit
from dataplane.proxy.reactor import EPOLLIN, Reactor

BATCH = 64
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_PAUSE = 0.1

_log = Log("proxy.acceptor")


class Acceptor:
    """Calls `serve(conn, addr)` for each accepted connection (non-blocking; TCP_NODELAY comes
    from the listener, see sockets.listener)."""

    def __init__(self, reactor: Reactor, sock: socket.socket,
                 serve: Callable[[socket.socket, Any], None], limit: ConnectionLimit | None = None) -> None:
        self.reactor = reactor
        self.sock = sock
        self.serve = serve
        self.limit = limit
        host, self.port = sock.getsockname()[:2]
        self.address = f"{host}_{self.port}"  # Envoy's listener_address stat tag
        self._fd = sock.fileno()
        reactor.register(self._fd, EPOLLIN, self._on_ready)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        self.reactor.unregister(self._fd)
        self.sock.close()

    def _on_ready(self, _mask: int) -> None:
        accept = self.sock._accept  # type: ignore[attr-defined]  # (fd, addr): skips socket.accept's wrapper
        family = self.sock.family
        limit = self.limit
        for _ in range(BATCH):
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    _log.warning("accept failed, pausing", error=os.strerror(e.errno), port=self.port)
                    self.reactor.modify(self._fd, 0)
                    self.reactor.call_later(_PAUSE, self._resume)
                    return
                continue  # ECONNABORTED and friends: that one client is gone
            if limit is not None and not limit.admit(fd, self.reactor.now, self.address):
                os.close(fd)
                continue
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
            conn.setblocking(False)
            try:
                self.serve(conn, addr)
            except Exception:
                _log.error("serving a connection failed", exc_info=True, port=self.port)
                conn.close()

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.reactor.modify(self._fd, EPOLLIN)
