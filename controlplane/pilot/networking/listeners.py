"""Listeners: which connections the proxy accepts and what it does with them
(Istio's core/v1alpha3/listener.go, with networkfilter.go for TCP/TLS routing).

Outbound: one per visible service port. HTTP ports hand requests to the route config
named by the port; TCP and TLS ports pick a weighted set of clusters from the
VirtualService's tcp/tls rules, or the service's own cluster. Inbound: one per port the
proxy's workload serves, carrying the mTLS mode its PeerAuthentication asks for.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from controlplane.pilot.model import Port, Protocol, Proxy, Service
from controlplane.pilot.networking.push_context import PushContext, ServiceInstance, SidecarScope
from controlplane.pilot.networking.routes import applies, is_http_port, weighted_clusters
from controlplane.pilot.networking.util import INBOUND, OUTBOUND, cluster_name
from meshapi.config import InboundListener, OutboundListener

TLS_PROTOCOLS = (Protocol.HTTPS, Protocol.TLS)


def http_connection_manager() -> dict[str, Any]:
    """What Istio's pilot sets on every HTTP connection manager that the proxy honours: websocket
    upgrades allowed. The timeouts are left to the proxy's defaults (dataplane/proxy/http/options.py)."""
    return {"upgrade_types": ["websocket"]}


def _l4_match(match: dict[str, Any]) -> dict[str, Any]:
    """What the proxy still has to check on a connection: where it was going, and its SNI."""
    out: dict[str, Any] = {}
    if match.get("destinationSubnets"):
        out["destination_subnets"] = list(match["destinationSubnets"])
    if match.get("sniHosts"):
        out["sni_hosts"] = list(match["sniHosts"])
    return out


def tcp_routes(push: PushContext, proxy: Proxy, scope: SidecarScope, service: Service,
               port: Port) -> list[dict[str, Any]]:
    """Ordered L4 routes; the first whose match fits the connection wins, and the last
    always matches (the service's own cluster unless a rule already catches everything)."""
    vs = scope.virtual_services.first(service.hostname)
    section = "tls" if port.protocol in TLS_PROTOCOLS else "tcp"
    out: list[dict[str, Any]] = []
    for rule in (vs.spec.get(section) if vs else None) or []:
        if rule.get("match"):
            candidates = [_l4_match(m) for m in rule["match"] if applies(m, proxy, port.number)]
        else:
            candidates = [{}]
        clusters = weighted_clusters(push, rule.get("route") or [], vs.namespace, port.number)
        out += [{"match": m, "clusters": clusters} for m in candidates]
        if {} in candidates:
            return out
    out.append({"match": {}, "clusters": [{"name": cluster_name(OUTBOUND, port.number, "", service.hostname),
                                           "weight": 100}]})
    return out


def build_outbound_listeners(push: PushContext, proxy: Proxy, scope: SidecarScope) -> list[OutboundListener]:
    listeners = []
    for service, ports in scope.services:
        for port in ports:
            listener: dict[str, Any] = {
                "name": f"{service.hostname}_{port.number}", "service": service.hostname,
                "addresses": sorted(service.addresses), "port": port.number, "protocol": port.protocol.value}
            if is_http_port(port.protocol):
                listener["route_config"] = str(port.number)
                listener["http"] = http_connection_manager()
            if not port.protocol.is_http:
                listener["tcp_routes"] = tcp_routes(push, proxy, scope, service, port)
            listeners.append(listener)
    return sorted(listeners, key=lambda li: (li["port"], li["service"]))


def build_inbound_listeners(instances: list[ServiceInstance], mtls_mode: str,
                            port_modes: dict[int, str]) -> list[InboundListener]:
    """One per workload port; services sharing a port share the listener (first protocol wins)."""
    by_port: dict[int, list[ServiceInstance]] = defaultdict(list)
    for inst in instances:
        by_port[inst.endpoint_port].append(inst)
    return [{"name": f"{INBOUND}_{number}", "port": number, "protocol": insts[0].port.protocol.value,
             "mtls_mode": port_modes.get(number, mtls_mode), "cluster": cluster_name(INBOUND, number),
             "services": [{"service": i.service.hostname, "port": i.port.number} for i in insts],
             **({"http": http_connection_manager()} if is_http_port(insts[0].port.protocol) else {})}
            for number, insts in sorted(by_port.items())]
