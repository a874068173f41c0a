"""Per-proxy config: what pilot sends each sidecar (Istio's pilot/pkg/networking).

`build_proxy_config(push, proxy)` is a pure function of a PushContext and a Proxy. Its
result is THE contract the proxy implements, in a deterministic order: meshapi/config.py
types every field (ProxyConfig) and says what each means.

Only the proxy's namespace and labels shape everything but the inbound side, so pilot
builds those parts once per (namespace, labels) and two such proxies get one version.
On the bus the config travels as parts (meshapi/parts.py); `version` hashes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.pilot.model import Proxy
from controlplane.pilot.networking.clusters import build_inbound_clusters, build_outbound_clusters
from controlplane.pilot.networking.endpoints import build_endpoints
from controlplane.pilot.networking.listeners import build_inbound_listeners, build_outbound_listeners
from controlplane.pilot.networking.push_context import PushContext
from controlplane.pilot.networking.routes import build_routes
from controlplane.pilot.networking.security import build_security, peer_authentication
from meshapi.config import ProxyConfig
from meshapi.parts import (
    PartSet,
    assemble,
    config_version,
    local_parts,
    shared_parts,
    split,
)

__all__ = ["ProxyParts", "PushContext", "build_proxy_config", "build_proxy_parts", "config_hash"]


@dataclass(eq=False)
class ProxyParts:
    """One proxy's config as published: the shared (outbound) set it follows and its own."""

    scope: str
    shared: PartSet
    local: PartSet
    version: str

    def config(self) -> ProxyConfig:
        return assemble(self.shared.values, self.local.values, self.version)


def config_hash(cfg: ProxyConfig) -> str:
    """The version of a whole config: equal configs, equal versions, whatever proxy they were
    built for (every part is built in a deterministic order, so equal parts encode equally)."""
    shared, local = split(cfg)
    return config_version(PartSet.of(shared).version, PartSet.of(local).version)


def scope_id(push: PushContext, proxy: Proxy) -> str:
    """Names the shared set: proxies with equal outbound keys follow the same one."""
    return hashlib.sha256(repr(push.outbound_key(proxy)).encode()).hexdigest()[:20]


def _shared(push: PushContext, proxy: Proxy, scope: str, previous: Mapping[str, PartSet]) -> PartSet:
    sidecar_scope = push.sidecar_scope(proxy)
    clusters = build_outbound_clusters(push, proxy, sidecar_scope)
    outbound = {"listeners": build_outbound_listeners(push, proxy, sidecar_scope),
                "outbound_traffic_policy": sidecar_scope.outbound_traffic_policy,
                "routes": build_routes(push, proxy, sidecar_scope),
                "clusters": clusters, "endpoints": build_endpoints(push, clusters)}
    return PartSet.of(shared_parts(outbound), previous.get(scope))


def build_proxy_parts(push: PushContext, proxy: Proxy, previous: Mapping[str, PartSet] | None = None,
                      local: PartSet | None = None) -> ProxyParts:
    """Everything one sidecar needs, as parts. Proxies with the same outbound key share one
    shared set per push; `previous` (scope -> set from the last push) lends its objects to
    unchanged parts, so consecutive versions hold one copy of what they have in common.
    `local`: the group's own set from the last push, when the caller knows that nothing it
    depends on changed (pilot, after an edit of outbound-only kinds)."""
    scope = scope_id(push, proxy)
    shared = push.cached(("shared", scope), lambda: _shared(push, proxy, scope, previous or {}))
    if local is not None:
        return ProxyParts(scope, shared, local, config_version(shared.version, local.version))
    instances = push.instances(proxy)
    key = ("local", proxy.namespace, tuple(sorted(proxy.labels.items())), proxy.service_account,
           tuple((i.service.hostname, i.port.number, i.endpoint_port) for i in instances))

    def build_local() -> PartSet:
        mode, port_modes = peer_authentication(push, proxy)
        clusters = build_inbound_clusters(push, instances)
        return PartSet.of(local_parts(build_inbound_listeners(instances, mode, port_modes), clusters,
                                      build_endpoints(push, clusters), build_security(push, proxy)))

    local = push.cached(key, build_local)
    return ProxyParts(scope, shared, local, config_version(shared.version, local.version))


def build_proxy_config(push: PushContext, proxy: Proxy) -> ProxyConfig:
    """Everything one sidecar needs (meshapi/config.py), in one dict."""
    return build_proxy_parts(push, proxy).config()
