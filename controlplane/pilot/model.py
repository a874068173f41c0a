"""Pilot's model: services, endpoints and proxies, whatever registry they came from.

Names follow Istio's pilot/pkg/model so an Istio developer finds their way: a Service
is a hostname with ports; an Endpoint is one workload address serving some of them;
a Proxy is a sidecar asking for config. Everything here is plain data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from meshapi.groups import group_id


class Protocol(enum.StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    HTTPS = "HTTPS"
    TLS = "TLS"
    TCP = "TCP"
    MONGO = "MONGO"
    MYSQL = "MYSQL"
    REDIS = "REDIS"
    UNKNOWN = "UNKNOWN"  # sniffed by the proxy: HTTP if the first bytes look like it, else TCP

    @property
    def is_http(self) -> bool:
        return self in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC)


_PREFIXES = {
    "http": Protocol.HTTP, "http2": Protocol.HTTP2, "grpc": Protocol.GRPC, "grpc-web": Protocol.HTTP,
    "https": Protocol.HTTPS, "tls": Protocol.TLS, "tcp": Protocol.TCP, "mongo": Protocol.MONGO,
    "mysql": Protocol.MYSQL, "redis": Protocol.REDIS, "h2c": Protocol.HTTP2,
}


def protocol_of(port_name: str = "", app_protocol: str = "", declared: str = "") -> Protocol:
    """Istio's rules: appProtocol first, then the port name's prefix (`http-web`, `grpc`),
    then a declared protocol (ServiceEntry ports); otherwise UNKNOWN (sniffed)."""
    for candidate in (app_protocol, port_name.split("-", 1)[0] if port_name else "", declared):
        if not candidate:
            continue
        proto = _PREFIXES.get(candidate.lower())
        if proto is not None:
            return proto
        if candidate.upper() in Protocol.__members__:
            return Protocol(candidate.upper())
    return Protocol.UNKNOWN


@dataclass(frozen=True)
class Port:
    name: str
    number: int
    protocol: Protocol
    target_port: int | None = None


@dataclass
class Service:
    hostname: str                      # FQDN: reviews.default.svc.cluster.local, or an SE host
    namespace: str
    ports: list[Port]
    name: str = ""                     # the Kubernetes name, when it came from a Service
    addresses: list[str] = field(default_factory=list)
    resolution: str = "STATIC"         # STATIC | DNS | DNS_ROUND_ROBIN | NONE (passthrough)
    mesh_external: bool = False
    selector: dict[str, str] = field(default_factory=dict)  # workloads backing it
    export_to: list[str] = field(default_factory=lambda: ["*"])
    source: str = ""                   # kubernetes | serviceentry

    def port(self, number: int) -> Port | None:
        return next((p for p in self.ports if p.number == number), None)


@dataclass
class Endpoint:
    """One address serving a service port (Istio's IstioEndpoint / ServiceInstance)."""

    hostname: str
    address: str
    port: int                          # the endpoint's port (target port)
    service_port: int                  # the service port it serves
    labels: dict[str, str] = field(default_factory=dict)
    locality: str = ""
    weight: int = 1
    service_account: str = ""
    network: str = ""
    healthy: bool = True
    source: str = ""                   # kubernetes | serviceentry | workloadentry | registration


@dataclass
class Proxy:
    """A sidecar as pilot knows it: who it is, where it runs, what it is labelled."""

    id: str                            # e.g. reviews-v1-7d8f.default
    namespace: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    node: str = ""
    locality: str = ""

    @property
    def group(self) -> str:
        """The config group it follows (meshapi.groups): equal inputs, one published config."""
        return group_id(self.namespace, self.labels, self.service_account)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A Kubernetes-style equality selector; an empty selector matches everything."""
    return all(labels.get(k) == v for k, v in selector.items())
