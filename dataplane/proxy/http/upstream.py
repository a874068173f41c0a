"""Upstream HTTP/1.1 connections of the sidecar, pooled per (cluster, endpoint) as Envoy's HTTP/1 pools.

One `Upstreams` per worker runtime holds an `EndpointPool` per cluster `Endpoint` (the object a
config swap carries over when the endpoint survives, so its pool and keep-alive connections do
too). An owner (a downstream request, or a mirror) holds one connection for one request at a time:

* `pool.idle` is a LIFO stack of keep-alive connections: the most recently used one is the one
  most likely still open on the server and still warm in its caches. Taking one costs a list pop;
  `Upstreams.acquire` opens a new one (non-blocking, under the cluster's connect timeout and its
  `max_connections` budget, which counts a connection until it closes), or queues the owner as
  a pending request under `http1_max_pending_requests`; past both: OVERFLOW (Envoy's breakers).
* Every connection is registered edge-triggered for IN|OUT|RDHUP once; an owner takes it over by
  `Reactor.set_callback` (no syscall), and an idle one points at `_on_idle`: readable, hung up or
  in error, an idle connection was closed by the server (or got bytes nobody asked for), so it is
  discarded before a request can be sent into the race (EPOLLOUT alone, from ACKs freeing send
  buffer, is no such sign). The race that remains (the server closes just as
  a request goes out) is the owner's to retry: `conn.reused` tells it the connection had served.
* `release(conn, reusable)` returns a connection after its response (honouring the cluster's
  max_requests_per_connection) and hands it straight to the first pending owner, if any.
* Idle connections are closed after the cluster's idle timeout (Istio's `idleTimeout`, 1 h by
  default) by one sweep a second while any is idle, not by a timer per request.

The owner protocol: `upstream_connected(conn)` once a new connection is up (the owner then
points the fd at its own handler), `upstream_failed(conn, detail)` when the connect fails or
times out (the pool has already closed it), and `upstream_ready(conn)` when a pending owner gets
a connection (an idle one, or a new one that will report `upstream_connected`).

Istio mutual TLS (tls.py): to a cluster with `tls.mode: ISTIO_MUTUAL` (with `auto`, only to endpoints
whose `tls_mode` is "istio") a new connection does the TLS handshake between the TCP connect and
`upstream_connected`, and the server's SPIFFE id must be one the cluster names in `subject_alt_names`
(else the endpoint's `service_account`). A failed handshake or a wrong identity is a connect failure
(the owner's UF). The connection is reused for keep-alive as any other: one handshake, many requests.
Owners read and write through `conn.read(n)` / `conn.write(data)`, which speak TLS when it is on.

No connection is ever opened to one of the proxy's own listeners (blackhole.py): `acquire` answers
BLACKHOLED instead, and the owner answers its client locally.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections import deque
from typing import Any, Protocol

from bus.logs import Log
from dataplane.proxy import blackhole, sockets, tls
from dataplane.proxy.blackhole import OwnListeners
from dataplane.proxy.cluster import Cluster, ConnectionPool, Endpoint
from dataplane.proxy.http.codec import ResponseParser
from dataplane.proxy.reactor import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor, Timer
from dataplane.proxy.stats import Stats

MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_GONE = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR  # on an idle connection: closed, or bytes unasked for
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's default upstream idle timeout, which Istio keeps
SWEEP_INTERVAL = 1.0
PENDING = "pending"  # acquire(): queued; the owner's upstream_ready() follows
OVERFLOW = "overflow"  # acquire(): a circuit breaker is open (503, flag UO)
BLACKHOLED = "blackholed"  # acquire(): the endpoint is one of the proxy's own listeners (blackhole.py)

_log = Log("proxy.upstream")


class Owner(Protocol):
    def upstream_connected(self, conn: UpstreamConn) -> None: ...
    def upstream_failed(self, conn: UpstreamConn, detail: str) -> None: ...
    def upstream_ready(self, conn: UpstreamConn) -> None: ...


class UpstreamConn:
    """One connection to an endpoint; `parser` is kept for its whole life (keep-alive)."""

    __slots__ = ("_idle_cb", "closed", "connected", "fd", "idle_since", "owner", "parser", "peer_id", "pool",
                 "read", "reused", "served", "sock", "timer", "upstreams", "write")

    def __init__(self, upstreams: Upstreams, pool: EndpointPool, sock: socket.socket) -> None:
        self.upstreams = upstreams
        self.pool = pool
        self.sock: Any = sock
        self.fd = sock.fileno()
        self.read, self.write = tls.io_funcs(sock)
        self.peer_id = ""  # the server's SPIFFE id over mutual TLS
        self.parser = ResponseParser()
        self.owner: Owner | None = None
        self.connected = False
        self.closed = False
        self.reused = False  # served a request before: a failure before any response byte may be a race
        self.served = 0
        self.idle_since = 0.0
        self.timer: Timer | None = None
        self._idle_cb = self._on_idle

    def _on_connect(self, mask: int) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.upstreams._connect_failed(self, sockets.errno_name(err))
        elif mask & EPOLLOUT:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            context = self.upstreams.tls_context(self.pool)
            if context is not None:
                self._handshake(context)
                return
            self._connected()

    def _connected(self) -> None:
        self.connected = True
        owner = self.owner
        if owner is not None:
            owner.upstream_connected(self)

    def _handshake(self, context: ssl.SSLContext) -> None:
        try:
            self.sock = context.wrap_socket(self.sock, server_side=False, do_handshake_on_connect=False)
        except OSError as exc:
            self.upstreams._connect_failed(self, "tls_error: " + str(exc))
            return
        timeout = self.pool.limits.connect_timeout_ms / 1000
        tls.Handshake(self.upstreams.reactor, self.sock, self._handshaken, register=False, confirm=True,
                      timeout=timeout)

    def _handshaken(self, sock: tls.TlsSocket | None, reason: str) -> None:
        if self.closed:
            return
        allowed = self.pool.tls or frozenset()
        if sock is not None and sock.early:  # an HTTP server speaks only when asked
            reason = "data before the request"
        if sock is None or reason or not tls.check_identity(sock.principal, allowed):
            reason = reason or "SAN mismatch"
            tls.log_refused(self.pool.address, allowed, sock.principal if sock else "", reason,
                            cluster=self.pool.cluster)
            self.upstreams._connect_failed(self, "tls_error: " + reason)
            return
        self.sock = sock
        self.read, self.write = sock.read, sock.send
        self.peer_id = sock.principal
        self.upstreams.reactor.set_callback(self.fd, self._idle_cb)  # until the owner points it at itself
        self._connected()

    def _on_idle(self, mask: int) -> None:
        """An idle connection is readable: the server closed it, or broke the protocol. Either way
        it cannot carry a request any more. EPOLLOUT alone says nothing: the kernel reports one
        when the server's ACKs free send buffer after the request went out, often after the
        response has come and the connection is idle. Closing on it cost a new connection (over
        mTLS a new handshake) for one request in five in the bookinfo mesh, and the heap churn
        of every handshake showed as growing memory."""
        if mask & _GONE:
            self.upstreams.close(self)


class EndpointPool:
    """The connections of one cluster endpoint, with the cluster's limits (updated on swaps)."""

    __slots__ = ("address", "cluster", "ep", "idle", "idle_timeout", "limits", "max_requests", "open", "tls",
                 "waiters")

    def __init__(self, cluster: Cluster, ep: Endpoint) -> None:
        self.address = (ep.address, ep.port)
        self.ep = ep
        self.idle: list[UpstreamConn] = []
        self.waiters: deque[Owner] = deque()
        self.open = 0
        self.update(cluster)

    def update(self, cluster: Cluster) -> None:
        self.cluster = cluster.name
        self.limits: ConnectionPool = cluster.pool
        self.max_requests = cluster.pool.max_requests_per_connection or 1 << 62
        http = (cluster.spec.get("connection_pool") or {}).get("http") or {}
        idle_ms = http.get("idle_timeout_ms")
        self.idle_timeout = idle_ms / 1000 if idle_ms else DEFAULT_IDLE_TIMEOUT
        self.tls = tls.mutual_tls(cluster.spec.get("tls"), self.ep)  # SPIFFE ids to accept, or None: plain


class Upstreams:
    """A worker's upstream connection pools (one reactor, not thread-safe)."""

    def __init__(self, reactor: Reactor, stats: Stats | None = None) -> None:
        self.reactor = reactor
        self.stats = stats
        self.certs: tls.WorkloadCerts | None = None  # the worker sets it when the proxy has --certs
        self.own: OwnListeners | None = None  # the worker's own listeners: never connected to
        self.pools: dict[Endpoint, EndpointPool] = {}
        self._sweeper: Timer | None = None
        self._warned_plain = False

    def tls_context(self, pool: EndpointPool) -> ssl.SSLContext | None:
        """The client context for a new connection of `pool`, or None for plain text (no mTLS asked,
        or no certificates: Istio mTLS then falls back to plain text, said once)."""
        if pool.tls is None:
            return None
        certs = self.certs
        if certs is None or certs.client is None:
            if not self._warned_plain:
                self._warned_plain = True
                _log.warning("ISTIO_MUTUAL cluster but no certificates (--certs): sending plain text",
                             cluster=pool.cluster)
            return None
        return certs.client

    def pool(self, cluster: Cluster, ep: Endpoint) -> EndpointPool:
        """The pool of `ep` in `cluster` (kept across config swaps while the Endpoint object lives)."""
        pool = self.pools.get(ep)
        if pool is None:
            pool = self.pools[ep] = EndpointPool(cluster, ep)
        elif pool.limits is not cluster.pool:
            pool.update(cluster)
        return pool

    def acquire(self, pool: EndpointPool, owner: Owner) -> UpstreamConn | str:
        """An idle connection, else a new one (connecting), else PENDING or OVERFLOW; BLACKHOLED
        when the endpoint is our own listener (counted and logged here)."""
        idle = pool.idle
        if idle:
            conn = idle.pop()
            conn.owner = owner
            return conn
        if self.own is not None and self.own.owns(*pool.address):
            blackhole.refused(self.stats, pool.address, "http", pool.cluster)
            return BLACKHOLED
        limits = pool.limits
        if limits.connections.try_acquire():
            return self._connect(pool, owner)
        if limits.pending.try_acquire():
            pool.waiters.append(owner)
            self._count(pool, "upstream_rq_pending_total")
            return PENDING
        self._count(pool, "upstream_rq_pending_overflow")
        return OVERFLOW

    def cancel(self, pool: EndpointPool, owner: Owner) -> None:
        """Take a pending owner out of the queue (it timed out or went away)."""
        with contextlib.suppress(ValueError):
            pool.waiters.remove(owner)
            pool.limits.pending.release()

    def _connect(self, pool: EndpointPool, owner: Owner) -> UpstreamConn:
        """A new connection, its budget already taken; failures are reported asynchronously."""
        sock, err = sockets.connect(pool.address)
        conn = UpstreamConn(self, pool, sock)
        conn.owner = owner
        pool.open += 1
        self._count(pool, "upstream_cx_total")
        reactor = self.reactor
        if err and err != errno.EINPROGRESS:
            reactor.call_soon(lambda: self._connect_failed(conn, sockets.errno_name(err)))
            return conn
        reactor.register(conn.fd, MASK, conn._on_connect)
        conn.timer = reactor.call_later(pool.limits.connect_timeout_ms / 1000,
                                        lambda: self._connect_failed(conn, "connect_timeout"))
        return conn

    def _connect_failed(self, conn: UpstreamConn, detail: str) -> None:
        if conn.closed:
            return
        self._count(conn.pool, "upstream_cx_connect_fail")
        owner = conn.owner
        self.close(conn)
        if owner is not None:
            owner.upstream_failed(conn, detail)

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """The owner is done with `conn`: keep it for the next request, or close it."""
        conn.owner = None
        conn.served += 1
        pool = conn.pool
        if not reusable or conn.closed or conn.served >= pool.max_requests or conn.parser.buffered:
            self.close(conn)
            return
        conn.reused = True
        self.reactor.set_callback(conn.fd, conn._idle_cb)  # until an owner points it at itself
        if pool.waiters:
            owner = pool.waiters.popleft()
            pool.limits.pending.release()
            conn.owner = owner
            owner.upstream_ready(conn)
            return
        conn.idle_since = self.reactor.now
        pool.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.reactor.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self, conn: UpstreamConn) -> None:
        """Close `conn` (idempotent) and let a pending owner have the connection budget it frees."""
        if conn.closed:
            return
        conn.closed = True
        conn.owner = None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        pool = conn.pool
        with contextlib.suppress(ValueError):
            pool.idle.remove(conn)
        reactor = self.reactor
        reactor.unregister(conn.fd)
        reactor.call_soon(conn.sock.close)  # after this batch: no new fd reuses the number meanwhile
        pool.open -= 1
        pool.limits.connections.release()
        if pool.waiters and pool.limits.connections.try_acquire():
            owner = pool.waiters.popleft()
            pool.limits.pending.release()
            owner.upstream_ready(self._connect(pool, owner))

    def _sweep(self) -> None:
        """Close idle connections past their idle timeout; runs while any connection is idle."""
        self._sweeper = None
        now = self.reactor.now
        any_idle = False
        for pool in list(self.pools.values()):
            idle = pool.idle
            if not idle:
                continue
            limit = now - pool.idle_timeout
            for conn in [c for c in idle if c.idle_since <= limit]:
                self.close(conn)
            any_idle = any_idle or bool(idle)
        if any_idle:
            self._sweeper = self.reactor.call_later(SWEEP_INTERVAL, self._sweep)

    def prune(self, live: set[Endpoint]) -> None:
        """Forget pools of endpoints no config uses any more: close their idle connections."""
        for ep, pool in list(self.pools.items()):
            if ep in live:
                continue
            for conn in list(pool.idle):
                self.close(conn)
            if not pool.open and not pool.waiters:
                del self.pools[ep]

    def close_all(self) -> None:
        """Close every idle connection (shutdown); connections in use close with their owners."""
        for pool in self.pools.values():
            for conn in list(pool.idle):
                self.close(conn)

    def _count(self, pool: EndpointPool, stat: str) -> None:
        if self.stats is not None:
            self.stats.inc(("cluster", pool.cluster, stat))

    def state(self) -> list[dict[str, Any]]:
        """Per endpoint pool: open, idle and pending counts (for the admin page and tests)."""
        return [{"cluster": p.cluster, "address": f"{p.address[0]}:{p.address[1]}", "open": p.open,
                 "idle": len(p.idle), "pending": len(p.waiters)} for p in self.pools.values()]
