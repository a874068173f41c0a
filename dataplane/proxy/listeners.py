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
  PassthroughCluster under ALLOW_ANY, refused under REGISTRY_ONLY. A destination that is one of
  the proxy's own listeners (a client dialling 15001 itself) is closed instead (blackhole.py).
- inbound: the workload port's listener (HTTP to the engine; TCP to the app on localhost),
  or a passthrough to the original destination for ports no service declares.
HTTP/2 and gRPC ports are carried at L4 (this proxy speaks HTTP/1.1).

Mutual TLS (Istio's PeerAuthentication, per inbound port as the listener's `mtls_mode`): STRICT
terminates TLS on every connection (no valid client certificate from our trust bundle: the handshake
fails and the connection closes; without certificates nobody can be verified, so STRICT ports
refuse); PERMISSIVE peeks at the first bytes and terminates TLS only for a ClientHello (0x16 0x03),
plain text otherwise (as Envoy's tls_inspector); DISABLE is plain text. The verified client's SPIFFE
id becomes the connection's principal (HTTP engine, L4 forwarder, stats). Over TLS an UNKNOWN port is
carried at L4: its bytes cannot be peeked through OpenSSL. Outbound L4 to an ISTIO_MUTUAL cluster
originates TLS (tcp.py), checking the server's identity.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from bus.logs import Log
from dataplane.proxy import blackhole, sockets, tls
from dataplane.proxy import flags as F
from dataplane.proxy.acceptor import Acceptor
from dataplane.proxy.blackhole import BLACKHOLE
from dataplane.proxy.cluster import CONNECT_FAILURE
from dataplane.proxy.http.options import http_options
from dataplane.proxy.reactor import EPOLLIN, EPOLLRDHUP
from dataplane.proxy.runtime import PASSTHROUGH, Runtime
from dataplane.proxy.stats import DESTINATION, SOURCE, TCP, Workload
from dataplane.proxy.tcp import Forwarder

Address = tuple[str, int]

SNIFF_TIMEOUT = 0.1
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
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


def looks_like_tls(prefix: bytes) -> bool | None:
    """True/False once `prefix` says whether a TLS ClientHello record (0x16 0x03) starts here."""
    return None if prefix == b"\x16" else prefix[:2] == b"\x16\x03"


class SidecarListener:
    """Accepts on one socket and hands each connection to the HTTP engine or an L4 Forwarder.

    `direction` is "outbound" or "inbound"; `explicit_port` (explicit mode) is the service
    port this listener stands for, in place of SO_ORIGINAL_DST.
    """

    def __init__(self, runtime: Runtime, sock: socket.socket, direction: str, *,
                 explicit_port: int | None = None, http_factory: Callable[..., Any] | None = None,
                 idle_timeout: float = 3600.0, mark: int = 0, certs: tls.WorkloadCerts | None = None,
                 app_host: str = _LOCALHOST, splice: bool = True) -> None:
        self.runtime = runtime
        self.certs = certs  # the workload's certificates (contexts reloaded in place), None: no mTLS
        self._warned: set[str] = set()
        self.sock = sock
        self.direction = direction
        self.explicit_port = explicit_port
        self.http_factory = http_factory
        self.idle_timeout = idle_timeout
        self.mark = mark
        self.splice = splice  # False: never splice (the copy-only row of benchmarks/proxy_l4.py)
        self.app_host = app_host  # inbound L4 goes to the app here (loopback pods: an address each)
        self.reporter = SOURCE if direction == "outbound" else DESTINATION
        self.connections: set[Forwarder] = set()
        self._keys: dict[Any, Any] = {}
        # explicit mode: the address the client dialled is this listener's (where a passthrough goes)
        self.explicit_ip: str = sock.getsockname()[0]
        self.acceptor = Acceptor(runtime.reactor, sock, self._serve, runtime.limit)

    def close(self) -> None:
        self.acceptor.close()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        self._dispatch(conn, addr[:2])

    def _target(self, conn: socket.socket) -> Address:
        if self.explicit_port is not None:
            return (self.explicit_ip, self.explicit_port)
        orig = sockets.original_dst(conn)
        return orig if orig is not None else conn.getsockname()[:2]

    def _dispatch(self, conn: socket.socket, peer: Address, principal: str = "") -> None:
        """`principal`: the peer's SPIFFE id when the inbound connection is mutual TLS."""
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
                if self._authorized(conn, peer, target, principal, PASSTHROUGH, ""):
                    self._forward(conn, peer, target, PASSTHROUGH, target, service="")
                return
            mode = listener.get("mtls_mode") or DISABLE
            if mode == STRICT:
                self._terminate(conn, peer, target, listener)
                return
            if mode == PERMISSIVE:
                self._peek_tls(conn, peer, target, listener)
                return
        self._carry(conn, peer, target, listener, principal)

    def _carry(self, conn: Any, peer: Address, target: Address, listener: dict[str, Any],
               principal: str = "") -> None:
        protocol = listener.get("protocol", "TCP")
        if protocol in L7_PROTOCOLS and self.http_factory is not None:
            self._http(conn, peer, target, listener, principal)
        elif protocol in SNIFFED and self.http_factory is not None and not tls.is_tls(conn):
            self._sniff(conn, peer, target, listener, principal)
        else:
            self._tcp(conn, peer, target, listener, principal)

    # mutual TLS (inbound) ------------------------------------------------------------------
    def _terminate(self, conn: socket.socket, peer: Address, target: Address,
                   listener: dict[str, Any]) -> None:
        """Handshake as the TLS server (client certificate required), then carry the plain bytes."""
        context = self.certs.server if self.certs is not None else None
        if context is None:
            self._warn_once("no-certs", "mTLS port refused: the proxy has no certificates (--certs)",
                            port=target[1])
            self._refuse(conn, peer, target, F.UF)
            return
        try:
            ssl_sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            with contextlib.suppress(OSError):
                conn.close()
            return

        def done(sock: tls.TlsSocket | None, reason: str) -> None:
            if sock is None:
                _log.debug("inbound TLS handshake failed", peer=f"{peer[0]}:{peer[1]}", port=target[1],
                           reason=reason)
                return
            self._carry(sock, peer, target, listener, sock.principal)

        tls.Handshake(self.runtime.reactor, ssl_sock, done, register=True)

    def _peek_tls(self, conn: socket.socket, peer: Address, target: Address,
                  listener: dict[str, Any]) -> None:
        """PERMISSIVE: a TLS ClientHello is terminated, anything else is plain text; a client that
        sends nothing within SNIFF_TIMEOUT (server-first) is plain text too."""
        def decide(is_tls: bool) -> None:
            if is_tls:
                self._terminate(conn, peer, target, listener)
            else:
                self._carry(conn, peer, target, listener)

        self._peek(conn, 2, looks_like_tls, decide)

    def _peek(self, conn: socket.socket, size: int, classify: Callable[[bytes], bool | None],
              decide: Callable[[bool], None]) -> None:
        """Peek at up to `size` first bytes (MSG_PEEK: they stay for whoever reads next) until
        `classify` says True or False (None: too few yet); EOF, an error or SNIFF_TIMEOUT of
        silence decide False."""
        reactor = self.runtime.reactor
        fd = conn.fileno()

        def settle(verdict: bool) -> None:
            timer.cancel()
            reactor.unregister(fd)
            decide(verdict)

        def readable(_mask: int) -> None:
            try:
                prefix = conn.recv(size, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                prefix = b""
            verdict = classify(prefix) if prefix else False
            if verdict is not None:
                settle(verdict)

        timer = reactor.call_later(SNIFF_TIMEOUT, lambda: settle(False))
        reactor.register(fd, EPOLLIN | EPOLLRDHUP, readable)

    def _warn_once(self, what: str, msg: str, **fields: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            _log.warning(msg, **fields)

    # protocols ---------------------------------------------------------------------------
    def _http(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any],
              principal: str = "") -> None:
        assert self.http_factory is not None
        options = http_options(listener.get("http"))  # checked when the config was applied
        if self.direction == "outbound":
            self.http_factory(self.runtime, conn, direction="outbound", inbound_cluster=None,
                              route_port=listener.get("route_config"), peer=peer, local=target,
                              options=options)
        else:
            self.http_factory(self.runtime, conn, direction="inbound", route_port=None,
                              inbound_cluster=listener["cluster"], peer=peer, local=target,
                              principal=principal, options=options)

    def _sniff(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any],
               principal: str = "") -> None:
        """Peek at the first bytes until they tell HTTP or not, or time out and carry the
        connection at L4 (server-first protocols send nothing first)."""
        def decide(is_http: bool) -> None:
            if is_http:
                self._http(conn, peer, target, listener, principal)
            else:
                self._tcp(conn, peer, target, listener, principal)

        self._peek(conn, 16, looks_like_http, decide)

    def _tcp(self, conn: socket.socket, peer: Address, target: Address, listener: dict[str, Any],
             principal: str = "") -> None:
        if self.direction == "inbound":
            cluster, service = listener["cluster"], _first_service(listener)
            if self._authorized(conn, peer, target, principal, cluster, service):
                self._forward(conn, peer, target, cluster, (self.app_host, target[1]), service=service,
                              principal=principal)
            return
        cluster_name = _tcp_cluster(listener.get("tcp_routes") or [], target[0], self.runtime.rng.random())
        if cluster_name is None:
            self._refuse(conn, peer, target, F.NR)
            return
        self._forward(conn, peer, target, cluster_name, None, service=listener.get("service", ""))

    def _forward(self, conn: Any, peer: Address, target: Address, cluster_name: str,
                 address: Address | None, service: str, principal: str = "") -> None:
        """Connect `conn` to `address`, or to an endpoint of `cluster_name` when it is None.
        `principal`: the downstream's SPIFFE id over mTLS (inbound)."""
        snap = self.runtime.snapshot
        cluster = snap.clusters.get(cluster_name)
        endpoint = None
        upstream_tls = None
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
                upstream_tls = self._upstream_tls(cluster.spec.get("tls"), endpoint)
        if self.runtime.own.owns(*address):  # it would come back here: Istio's BlackHoleCluster
            blackhole.refused(self.runtime.stats, address, "tcp", cluster_name)
            self._refuse(conn, peer, target, F.UH)
            return
        if upstream_tls is not None and len(upstream_tls[1]) == 1:
            principal = next(iter(upstream_tls[1]))  # the one identity this connection can reach
        key = self._key(cluster_name, service, principal)
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
                        mark=self.mark, splice=self.splice, downstream_addr=peer, orig_dst=target)
        self.connections.add(fwd)
        timeout = (cluster.pool.connect_timeout_ms / 1000) if cluster is not None else 10.0
        fwd.connect(address, timeout, tls=upstream_tls)

    def _upstream_tls(self, spec: dict[str, Any] | None, endpoint: Any) -> Any:
        """(client context, allowed SPIFFE ids) when Istio mTLS applies to `endpoint`, else None
        (also without certificates: Istio mTLS then falls back to plain text, said once)."""
        allowed = tls.mutual_tls(spec, endpoint)
        if allowed is None:
            return None
        context = self.certs.client if self.certs is not None else None
        if context is None:
            self._warn_once("plain", "ISTIO_MUTUAL cluster but no certificates (--certs): sending plain text")
            return None
        return context, allowed

    def _authorized(self, conn: Any, peer: Address, target: Address, principal: str, cluster: str,
                    service: str) -> bool:
        """The workload's AuthorizationPolicies for an inbound connection carried at L4 (authz.py):
        a denied one is counted (flag RBAC) and closed at once."""
        authz = self.runtime.snapshot.authz
        if not authz.active or authz.check_tcp(peer[0], principal, target[1]).allowed:
            return True
        key = self._key(cluster, service, principal)
        self.runtime.stats.tcp_opened(key, F.RBAC)
        self.runtime.stats.tcp_closed(key, F.RBAC)
        with contextlib.suppress(OSError):
            conn.close()
        return False

    def _refuse(self, conn: socket.socket, peer: Address, target: Address, flag: str) -> None:
        key = self._key(BLACKHOLE, "")
        self.runtime.stats.tcp_opened(key, flag)
        self.runtime.stats.tcp_closed(key, flag)
        with contextlib.suppress(OSError):
            conn.close()

    def _key(self, cluster: str, service: str, principal: str = "") -> Any:
        """The TCP stats key; `principal` (the peer's SPIFFE id) makes it a mutual TLS one."""
        key = self._keys.get((cluster, service, principal))
        if key is None:
            name = service.split(".")[0] if service else ""
            stats = self.runtime.stats
            key = stats.request_key(self.reporter, Workload(), service_host=service or cluster,
                                    service_name=name or cluster, protocol=TCP)
            if principal:
                key = stats.mutual_tls(key, principal)
            self._keys[cluster, service, principal] = key
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
