"""A bound on the downstream connections one worker holds (Envoy's overload manager
`global_downstream_max_connections`).

Why: every connection costs file descriptors (its own, its upstream's, while splicing a pipe per
direction); a worker that runs out cannot accept or connect any more, and every later request hangs.
Past the bound a worker accepts a new connection and closes it at once, as Envoy does: the client
learns at once instead of waiting in the kernel's backlog; the listener counts it in
`listener.<address>.downstream_global_cx_overflow` and the worker logs one warning per burst, then
one line when it accepts again. Nothing needs resetting: a connection that closes frees its place.

How connections are counted: an accepted connection is remembered as (fd, socket inode) and never
told about again; it is gone once its fd is closed or holds another file. So no close path (HTTP,
L4, TLS, sniffing, refusals, whatever comes later) has to report back, and nothing can leak a
place. The list is recounted (one fstat per entry) only when it has reached the bound, and at most
every RECOUNT seconds: past the bound a worker may refuse for that long after a close.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

from bus.logs import BurstLog, Log
from dataplane.proxy.stats import Stats

RECOUNT = 0.1  # seconds between recounts while at the bound
FDS_PER_CONNECTION = 3  # downstream, upstream and a share of splice pipes and pooled connections
RESERVED_FDS = 256  # the worker's own: listeners, epoll, control, certificates, logs
MIN_LIMIT = 16

_log = Log("proxy.connlimit")


def default_limit() -> int:
    """The bound when none is given: what the soft open-file limit leaves room for."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(MIN_LIMIT, (soft - RESERVED_FDS) // FDS_PER_CONNECTION)


def socket_inode(fd: int) -> int | None:
    """What `fd` holds now (its inode), None when it is closed."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


class ConnectionLimit:
    """At most `limit` accepted connections open at once, over all of a worker's listeners."""

    def __init__(self, limit: int, stats: Stats | None = None, *,
                 identity: Callable[[int], int | None] = socket_inode, log: Log = _log) -> None:
        if limit < 1:
            raise ValueError(f"the connection limit must be at least 1, not {limit}")
        self.limit = limit
        self.stats = stats
        self.identity = identity
        self.rejected = 0
        self._open: dict[int, int] = {}  # fd -> inode when accepted; closed ones until a recount
        self._recounted_at = float("-inf")
        self._full = False
        self._log = log
        self._burst = BurstLog(log)

    def admit(self, fd: int, now: float, listener: str) -> bool:
        """Whether the connection just accepted on `fd` may stay; False: the caller closes it."""
        opened = self._open
        opened.pop(fd, None)  # the kernel handed this number out again: its last holder is closed
        if len(opened) >= self.limit:
            if now - self._recounted_at >= RECOUNT:
                self.recount(now)
            if len(opened := self._open) >= self.limit:
                self._reject(listener)
                return False
        ino = self.identity(fd)
        if ino is not None:
            opened[fd] = ino
        if self._full:
            self._full = False
            self._log.info("accepting again: below the downstream connection limit", limit=self.limit,
                           open=len(opened), rejected=self.rejected)
        return True

    def recount(self, now: float) -> int:
        """Forget connections closed since they were accepted; the number still open."""
        identity = self.identity
        self._open = {fd: ino for fd, ino in self._open.items() if identity(fd) == ino}
        self._recounted_at = now
        return len(self._open)

    def _reject(self, listener: str) -> None:
        self.rejected += 1
        self._full = True
        if self.stats is not None:
            self.stats.inc(("listener", listener, "downstream_global_cx_overflow"))
        self._burst.event("connection-limit", "downstream connection limit reached: closing new connections",
                          limit=self.limit, listener=listener, rejected=self.rejected)
