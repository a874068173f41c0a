"""The sidecar's accept path: which listener a connection belongs to, and L4 or L7 for it.

Transparent mode has two sockets, as Istio's sidecar does: 15001 for what the workload
dials out (iptables REDIRECT; the target comes from SO_ORIGINAL_DST) and 15006 for what
comes in. Explicit mode (no iptables) binds a loopback listener per outbound service port
that stands for that port on any address, and the inbound side is not intercepted.

Per connection, the Snapshot in force decides:
- outbound: the listener owning (VIP, port), else one taking the whole port; HTTP ones go to
  the HTTP engine with the port's route config, TCP ones to the first matching tcp_route's
  weighted clusters; UNKNOWN ports are sniffed: the first bytes, peeked (not consumed)
  within SNIFF_TIMEOUT, decide HTTP or TCP, as Istio's protocol detection does. No listener:
  PassthroughCluster under ALLOW_ANY, refused under REGISTRY_ONLY.
- inbound: the workload port's listener (HTTP to the engine; TCP to the app on localhost),
  or a passthrough to the original destination for ports no service declares.
HTTP/2 and gRPC ports are carried at L4 (this proxy speaks HTTP/1.1).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from bus.logs import Log
from dataplane.proxy import flags as F
from dataplane.proxy import sockets
from dataplane.proxy.acceptor import Acceptor
from dataplane.proxy.cluster import CONNECT_FAILURE
from dataplane.proxy.reactor import EPOLLIN, EPOLLRDHUP
from dataplane.proxy.runtime import BLACKHOLE, PASSTHROUGH, Runtime
from dataplane.proxy.stats import DESTINATION, SOURCE, TCP, Workload
from dataplane.proxy.tcp import Forwarder

Address = tuple[str, int]

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
SNIFF_TIMEOUT = 0.1
L7_PROTOCOLS = frozenset({"HTTP"})
SNIFFED = frozenset({"UNKNOWN"})
_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
_LOCALHOST = "127.0.0.1"

_log = Log("proxy.listener")


def looks_like_http(prefix: bytes) -> bool | None:
    """True/False once `prefix` says whether an HTTP/1.x request starts here; None: too short."""
    for method in _METHODS:
        n = min(len(prefix), len(method))
        if prefix[:n] == method[:n]:
            return None if n < len(method) else True
    return False


class SidecarListener:
    """Accepts on one socket and hands each connection to the HTTP engine or an L4 Forwarder.

    `direction` is "outbound" or "inbound"; `explicit_port` (explicit mode) is the service
    port this listener stands for, in place of SO_ORIGINAL_DST.
    """

    def __init__(self, runtime: Runtime, sock: socket.socket, direction: str, *,
                 explicit_port: int | None = None, http_factory: Callable[..., Any] | None = None,
                 idle_timeout: float = 3600.0, mark: int = 0) -> None:
        self.runtime = runtime
        self.sock = sock
        self.direction = direction
        self.explicit_port = explicit_port
        self.http_factory = http_factory
        self.idle_timeout = idle_timeout
        self.mark = mark
        self.reporter = SOURCE if direction == "outbound" else DESTINATION
        self.connections: set[Forwarder] = set()
        self._keys: dict[Any, Any] = {}
        self.acceptor = Acceptor(runtime.reactor, sock, self._serve)

    def close(self) -> None:
        self.acceptor.close()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        self._dispatch(conn, addr[:2])

    def _target(self, conn: socket.socket) -> Address:
        if self.explicit_port is not None:
            return (_LOCALHOST, self.explicit_port)
        orig = sockets.original_dst(conn)
        return orig if orig is not None else conn.getsockname()[:2]

    def _dispatch(self, conn: socket.socket, peer: Address) -> None:
        target = self._target(conn)
        snap = self.runtime.snapshot
        if self.direction == "outbound":
            listener = snap.outbound_listener(target[0], target[1])
            if listener is None:
                if snap.outbound_policy == "REGISTRY_ONLY":
                    self._refuse(conn, peer, target, F.NR)
                else:
                    self._forward(conn, peer, target, PASSTHROUGH, target, service="")
                return
        else:
            listener = snap.inbound.get(target[1])
            if listener is None:  # no service declares this port: Istio's inbound passthrough
                self._forward(conn, peer, target, PASSTHROUGH, target, service="")
                return
        protocol = listener.get("protocol", "TCP")
        if protocol in L7_PROTOCOLS and self.http_factory is not None:
            self._http(conn, peer, target, listener)
        elif protocol in SNIFFED and self.http_factory is not None:
            self._sniff(conn, peer, target, listener)
        else:
            self._tcp(conn, peer, target, listener)

    # protocols ---------------------------------------------------------------------------
    def _http(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any]) -> None:
        assert self.http_factory is not None
        if self.direction == "outbound":
            self.http_factory(self.runtime, conn, direction="outbound", inbound_cluster=None,
                              route_port=listener.get("route_config"), peer=peer, local=target)
        else:
            self.http_factory(self.runtime, conn, direction="inbound", route_port=None,
                              inbound_cluster=listener["cluster"], peer=peer, local=target)

    def _sniff(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any]) -> None:
        """Peek at the first bytes (leaving them in the socket) until they tell, or time out
        and carry the connection at L4 (server-first protocols send nothing first)."""
        reactor = self.runtime.reactor
        fd = conn.fileno()

        def decide(is_http: bool) -> None:
            timer.cancel()
            reactor.unregister(fd)
            if is_http:
                self._http(conn, peer, target, listener)
            else:
                self._tcp(conn, peer, target, listener)

        def readable(_mask: int) -> None:
            try:
                prefix = conn.recv(16, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                prefix = b""
            verdict = looks_like_http(prefix) if prefix else False
            if verdict is not None:
                decide(verdict)

        timer = reactor.call_later(SNIFF_TIMEOUT, lambda: decide(False))
        reactor.register(fd, EPOLLIN | EPOLLRDHUP, readable)

    def _tcp(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any]) -> None:
        if self.direction == "inbound":
            self._forward(conn, peer, target, listener["cluster"], (_LOCALHOST, target[1]),
                          service=_first_service(listener))
            return
        cluster_name = _tcp_cluster(listener.get("tcp_routes") or [], target[0], self.runtime.rng.random())
        if cluster_name is None:
            self._refuse(conn, peer, target, F.NR)
            return
        self._forward(conn, peer, target, cluster_name, None, service=listener.get("service", ""))

    def _forward(self, conn: socket.socket, peer: Address, target: Address, cluster_name: str,
                 address: Address | None, service: str) -> None:
        """Connect `conn` to `address`, or to an endpoint of `cluster_name` when it is None."""
        snap = self.runtime.snapshot
        cluster = snap.clusters.get(cluster_name)
        endpoint = None
        if address is None:
            if cluster is None:
                self._refuse(conn, peer, target, F.NR)
                return
            if cluster.original_destination:
                address = target
            else:
                endpoint = cluster.pick()
                if endpoint is None:
                    self._refuse(conn, peer, target, F.UH)
                    return
                address = (endpoint.address, endpoint.port)
        key = self._key(cluster_name, service)
        stats = self.runtime.stats
        stats.tcp_opened(key)
        if cluster is not None and endpoint is not None:
            cluster.start(endpoint)

        def closed(fwd: Forwarder) -> None:
            self.connections.discard(fwd)
            flag = fwd.flags or "-"
            stats.record_tcp(key, fwd.bytes_received, fwd.bytes_sent, flag)
            stats.tcp_closed(key, flag)
            if cluster is not None and endpoint is not None:
                failure = CONNECT_FAILURE if fwd.flags == F.UF else None
                cluster.finish(endpoint, self.runtime.reactor.now * 1000, failure=failure)

        fwd = Forwarder(self.runtime.reactor, conn, on_close=closed, idle_timeout=self.idle_timeout,
                        mark=self.mark, downstream_addr=peer, orig_dst=target)
        self.connections.add(fwd)
        timeout = (cluster.pool.connect_timeout_ms / 1000) if cluster is not None else 10.0
        fwd.connect(address, timeout)

    def _refuse(self, conn: socket.socket, peer: Address, target: Address, flag: str) -> None:
        key = self._key(BLACKHOLE, "")
        self.runtime.stats.tcp_opened(key, flag)
        self.runtime.stats.tcp_closed(key, flag)
        with contextlib.suppress(OSError):
            conn.close()

    def _key(self, cluster: str, service: str) -> Any:
        key = self._keys.get((cluster, service))
        if key is None:
            name = service.split(".")[0] if service else ""
            key = self._keys[cluster, service] = self.runtime.stats.request_key(
                self.reporter, Workload(), service_host=service or cluster, service_name=name or cluster,
                protocol=TCP)
        return key


def _first_service(listener: dict[str, Any]) -> str:
    services = listener.get("services") or []
    return services[0]["service"] if services else ""


def _tcp_cluster(tcp_routes: list[dict[str, Any]], dest_ip: str, u: float) -> str | None:
    """The first tcp_route whose match fits the destination; a weighted pick of its clusters.
    SNI matches need a TLS ClientHello, which plain TCP carrying does not read: they do not fit."""
    for route in tcp_routes:
        match = route.get("match") or {}
        if match.get("sni_hosts"):
            continue
        subnets = match.get("destination_subnets")
        if subnets and not any(ipaddress.ip_address(dest_ip) in ipaddress.ip_network(s, strict=False)
                               for s in subnets):
            continue
        clusters = route["clusters"]
        total = sum(c["weight"] for c in clusters) or 1
        point = u * total
        for c in clusters:
            point -= c["weight"]
            if point < 0:
                return c["name"]
        return clusters[-1]["name"]
    return None
