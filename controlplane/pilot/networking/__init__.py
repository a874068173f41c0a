"""Per-proxy config: what pilot sends each sidecar (Istio's pilot/pkg/networking).

`build_proxy_config(push, proxy)` is a pure function of a PushContext and a Proxy. Its
result is THE contract the proxy implements: plain dicts, lists, strings, ints, floats
and bools (JSON- and msgpack-safe), in a deterministic order. Durations are integer
milliseconds (`*_ms`), percentages floats in [0, 100]. Keys marked `?` appear only when
set; a match field that is absent matches anything.

    version: str                        sha256 of the canonical JSON of everything else
    listeners:
      outbound_traffic_policy: "ALLOW_ANY" | "REGISTRY_ONLY"
      outbound: [                       sorted by (port, service); one per visible service port
        {name: "<host>_<port>", service: host, addresses: [vip], port, protocol,
         route_config?: "<port>",       HTTP (and UNKNOWN, sniffed) ports: a key of `routes`
         http?: HttpOptions,            the same ports: the HTTP connection manager's settings
         tcp_routes?: [                 non-HTTP (and UNKNOWN) ports; first match wins, last always matches
           {match: {destination_subnets?: [cidr], sni_hosts?: [host]},
            clusters: [{name, weight}]}]}]
      inbound: [                        one per port the proxy's own workload serves
        {name: "inbound_<port>", port, protocol, mtls_mode: STRICT|PERMISSIVE|DISABLE,
         cluster: "inbound|<port>||", services: [{service: host, port: service port}],
         http?: HttpOptions}]           HTTP (and UNKNOWN) ports
        HttpOptions = {request_headers_timeout_ms?, stream_idle_timeout_ms?, idle_timeout_ms?,
                       upgrade_types?: [str]}   pilot sets upgrade_types ["websocket"], as Istio does
    routes: {"<port>": {name, virtual_hosts: [
        {name: "<host>:<port>", service?: host,
         domains: [...],                exact Host/:authority values; "*" only in the last (fallback) host
         routes: [                      ordered; the first whose match fits wins
           {name, virtual_service?: "ns/name",
            match: {uri?, scheme?, method?, authority?: StringMatch,
                    headers?, query_params?, without_headers?: {name: StringMatch},
                    ignore_uri_case?: true},
            then exactly one of:
              clusters: [{name, weight, headers?: HeaderOps}]   weights sum to 100
              redirect: {uri?, authority?, port?, scheme?, derive_port?, prefix_rewrite?, redirect_code}
              direct_response: {status, body?}
            timeout_ms?, retries?: {attempts, per_try_timeout_ms, retry_on: [..],
                                    retriable_status_codes: [int], backoff_ms?},
            rewrite?: {uri?, authority?, uri_regex?: {match, rewrite}},
            mirrors?: [{cluster, percentage}],
            fault?: {delay?: {fixed_delay_ms, percentage}, abort?: {http_status | grpc_status, percentage}},
            headers?: HeaderOps, cors?: Istio's corsPolicy as written}]}]}}
        StringMatch = {exact | prefix | regex: str} or {present: true}
        HeaderOps = Istio's Headers as written: {request?, response?: {set?, add?: {k: v}, remove?: [k]}}
        `clusters` may name `PassthroughCluster` (forward to the original destination); header
        names in matches are lower-case; `ignore_uri_case` applies to `uri` exact/prefix.
    clusters: {name: {                  sorted by name
        name, direction: "outbound" | "inbound", type: EDS|STRICT_DNS|LOGICAL_DNS|ORIGINAL_DST|STATIC,
        service?, port?, subset?, protocol?, subset_labels?: {k: v}, destination_rule?: "ns/name",
        lb?: {simple: LEAST_REQUEST|ROUND_ROBIN|RANDOM|PASSTHROUGH}
             | {consistent_hash: {http_header_name? | http_cookie?: {name, path?, ttl_ms?}
                                  | use_source_ip? | http_query_parameter_name?,
                                  minimum_ring_size?, maglev_table_size?}},
        connection_pool?: {tcp: {connect_timeout_ms, max_connections?, max_connection_duration_ms?,
                                 idle_timeout_ms?},
                           http: {http1_max_pending_requests?, http2_max_requests?,
                                  max_requests_per_connection?, max_retries?, idle_timeout_ms?}},
        outlier_detection?: {consecutive_5xx_errors, consecutive_gateway_errors, interval_ms,
                             base_ejection_time_ms, max_ejection_percent, min_health_percent},
        tls?: {mode: DISABLE|SIMPLE|MUTUAL|ISTIO_MUTUAL, sni?, subject_alt_names?: [..],
               client_certificate?, private_key?, ca_certificates?, ca_crl?, credential_name?,
               insecure_skip_verify?, auto?: bool}}}
        `outbound|<port>|<subset>|<host>` and `inbound|<port>||`, plus PassthroughCluster
        (ORIGINAL_DST) and BlackHoleCluster (no endpoints: fail the connection). 0 errors in
        outlier detection turn that check off. `auto: true` is Istio's auto mTLS: use mTLS
        to endpoints whose `tls_mode` is "istio" and plain text to the others.
    endpoints: {cluster name: [        every cluster except ORIGINAL_DST ones, address order
        {address, port, weight, locality, healthy, labels, service_account: spiffe id or "",
         tls_mode: "istio" | "disabled"}]}
    security:
      mtls: {mode: STRICT|PERMISSIVE|DISABLE, ports: {"<port>": mode}}
      authorization: [{name: "ns/name", action: CUSTOM|DENY|ALLOW|AUDIT, rules: Istio's rules as written,
                       provider?: name}]           in evaluation order: CUSTOM, DENY, ALLOW, AUDIT
      path_normalization: NONE|BASE|MERGE_SLASHES|DECODE_AND_MERGE_SLASHES   meshConfig.pathNormalization:
                                        how every request's path is normalised before authorization,
                                        routing and forwarding (both directions)

Only the proxy's namespace and labels shape everything but the inbound side, so pilot
builds those parts once per (namespace, labels) and two such proxies get one version.
On the bus the config travels as parts (see parts.py); `version` hashes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.pilot.model import Proxy
from controlplane.pilot.networking.clusters import build_inbound_clusters, build_outbound_clusters
from controlplane.pilot.networking.endpoints import build_endpoints
from controlplane.pilot.networking.listeners import build_inbound_listeners, build_outbound_listeners
from controlplane.pilot.networking.parts import (
    PartSet,
    assemble,
    config_version,
    local_parts,
    shared_parts,
    split,
)
from controlplane.pilot.networking.push_context import PushContext
from controlplane.pilot.networking.routes import build_routes
from controlplane.pilot.networking.security import build_security, peer_authentication

__all__ = ["ProxyParts", "PushContext", "build_proxy_config", "build_proxy_parts", "config_hash"]


@dataclass(eq=False)
class ProxyParts:
    """One proxy's config as published: the shared (outbound) set it follows and its own."""

    scope: str
    shared: PartSet
    local: PartSet
    version: str

    def config(self) -> dict[str, Any]:
        return assemble(self.shared.values, self.local.values, self.version)


def config_hash(cfg: dict[str, Any]) -> str:
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


def build_proxy_config(push: PushContext, proxy: Proxy) -> dict[str, Any]:
    """Everything one sidecar needs, as the module docstring describes it, in one dict."""
    return build_proxy_parts(push, proxy).config()
