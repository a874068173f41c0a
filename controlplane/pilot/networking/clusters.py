"""Clusters: where traffic for a service port (and subset) goes and how (Istio's core/v1alpha3/cluster.go).

Each service port a proxy can reach gets `outbound|<port>||<host>`, and each subset of
its DestinationRule `outbound|<port>|<subset>|<host>`, with the rule's traffic policy
merged as Istio merges it. The proxy's own workload gets `inbound|<port>||` clusters.
"""

from __future__ import annotations

from typing import Any

from controlplane.config.model import Resource
from controlplane.pilot.model import Proxy, Service
from controlplane.pilot.networking.push_context import PushContext, ServiceInstance, SidecarScope
from controlplane.pilot.networking.security import DISABLE, namespace_mtls_mode
from controlplane.pilot.networking.util import (
    BLACKHOLE_CLUSTER,
    INBOUND,
    OUTBOUND,
    PASSTHROUGH_CLUSTER,
    cluster_name,
    millis,
    pick,
)
from meshapi.config import Cluster

POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
CLUSTER_TYPES = {"STATIC": "EDS", "DNS": "STRICT_DNS", "DNS_ROUND_ROBIN": "LOGICAL_DNS",
                 "NONE": "ORIGINAL_DST"}
DEFAULT_LB = "LEAST_REQUEST"  # Istio's default since 1.14; LEAST_CONN is its old name
ISTIO_MUTUAL = "ISTIO_MUTUAL"
TLS_FIELDS = {"sni": "sni", "subjectAltNames": "subject_alt_names", "clientCertificate": "client_certificate",
              "privateKey": "private_key", "caCertificates": "ca_certificates", "caCrl": "ca_crl",
              "credentialName": "credential_name", "insecureSkipVerify": "insecure_skip_verify"}
TCP_POOL = {"maxConnections": "max_connections", "connectTimeout": "connect_timeout_ms",
            "maxConnectionDuration": "max_connection_duration_ms", "idleTimeout": "idle_timeout_ms"}
HTTP_POOL = {"http1MaxPendingRequests": "http1_max_pending_requests",
             "http2MaxRequests": "http2_max_requests",
             "maxRequestsPerConnection": "max_requests_per_connection",
             "maxRetries": "max_retries", "idleTimeout": "idle_timeout_ms"}
POOL_DURATIONS = ("connectTimeout", "maxConnectionDuration", "idleTimeout")
HASH_KEYS = {"httpHeaderName": "http_header_name", "useSourceIp": "use_source_ip",
             "httpQueryParameterName": "http_query_parameter_name"}
COOKIE_KEYS = {"name": "name", "path": "path", "ttl": "ttl_ms"}
Policy = dict[str, Any]


def merge_traffic_policy(rule: Policy | None, subset: Policy | None, port: int) -> Policy:
    """Istio's MergeTrafficPolicy: a subset's fields replace the rule's, and a matching
    portLevelSettings entry replaces all four fields at once (port settings do not inherit)."""
    merged: Policy = {}
    for policy in (rule, subset):
        if not policy:
            continue
        merged |= {f: policy[f] for f in POLICY_FIELDS if policy.get(f) is not None}
        for settings in policy.get("portLevelSettings") or []:
            if (settings.get("port") or {}).get("number") == port:
                merged = {f: settings[f] for f in POLICY_FIELDS if settings.get(f) is not None}
                break
    return merged


def _load_balancer(lb: dict[str, Any] | None) -> dict[str, Any]:
    lb = lb or {}
    hashing = lb.get("consistentHash")
    if not hashing:
        simple = lb.get("simple", DEFAULT_LB)
        return {"simple": DEFAULT_LB if simple in ("UNSPECIFIED", "LEAST_CONN") else simple}
    out = pick(hashing, HASH_KEYS)
    if hashing.get("httpCookie"):
        out["http_cookie"] = pick(hashing["httpCookie"], COOKIE_KEYS, ("ttl",))
    ring = hashing.get("minimumRingSize") or (hashing.get("ringHash") or {}).get("minimumRingSize")
    if ring:
        out["minimum_ring_size"] = ring
    if hashing.get("maglev"):
        out["maglev_table_size"] = hashing["maglev"].get("tableSize", 65537)
    return {"consistent_hash": out}


def _connection_pool(pool: dict[str, Any] | None, connect_timeout_ms: int) -> dict[str, Any]:
    pool = pool or {}
    tcp = {"connect_timeout_ms": connect_timeout_ms} | pick(pool.get("tcp"), TCP_POOL, POOL_DURATIONS)
    return {"tcp": tcp, "http": pick(pool.get("http"), HTTP_POOL, POOL_DURATIONS)}


def _outlier_detection(od: dict[str, Any]) -> dict[str, Any]:
    """Envoy's defaults fill what the rule leaves out; 0 errors turns that check off."""
    five_xx = od.get("consecutive5xxErrors")
    if five_xx is None:
        five_xx = od.get("consecutiveErrors") or 5
    return {"consecutive_5xx_errors": five_xx,
            "consecutive_gateway_errors": od.get("consecutiveGatewayErrors", 0),
            "interval_ms": millis(od.get("interval"), 10_000),
            "base_ejection_time_ms": millis(od.get("baseEjectionTime"), 30_000),
            "max_ejection_percent": od.get("maxEjectionPercent", 10),
            "min_health_percent": od.get("minHealthPercent", 0)}


def _tls(push: PushContext, service: Service, tls: Policy | None, port: int, subset: str) -> dict[str, Any]:
    """The client TLS the rule asks for; with none, Istio's auto mTLS: ISTIO_MUTUAL to in-mesh
    destinations (per endpoint `tls_mode`) unless their namespace disables mTLS."""
    mode = (tls or {}).get("mode")
    auto = not mode
    if auto:
        in_mesh = push.enable_auto_mtls and not service.mesh_external
        in_mesh = in_mesh and namespace_mtls_mode(push, service.namespace) != DISABLE
        mode = ISTIO_MUTUAL if in_mesh else DISABLE
    out: dict[str, Any] = {"mode": mode}
    if mode == DISABLE:
        return out
    out |= pick(tls, TLS_FIELDS)
    if mode == ISTIO_MUTUAL:
        out.setdefault("sni", f"outbound_.{port}_.{subset}_.{service.hostname}")
        out.setdefault("subject_alt_names", push.service_accounts(service))
        out["auto"] = auto
    return out


def service_clusters(push: PushContext, service: Service, rule: Resource | None) -> list[dict[str, Any]]:
    """All clusters of one service under one DestinationRule (shared by every proxy that sees both)."""
    spec = rule.spec if rule else {}
    subsets = [s for s in spec.get("subsets") or [] if s.get("name")]
    out = []
    for port in service.ports:
        for subset in [None, *subsets]:
            name = subset["name"] if subset else ""
            policy = merge_traffic_policy(spec.get("trafficPolicy"), subset and subset.get("trafficPolicy"),
                                          port.number)
            cluster: dict[str, Any] = {
                "name": cluster_name(OUTBOUND, port.number, name, service.hostname),
                "direction": OUTBOUND, "service": service.hostname, "port": port.number, "subset": name,
                "protocol": port.protocol.value, "type": CLUSTER_TYPES.get(service.resolution, "EDS"),
                "lb": _load_balancer(policy.get("loadBalancer")),
                "connection_pool": _connection_pool(policy.get("connectionPool"), push.connect_timeout_ms),
                "tls": _tls(push, service, policy.get("tls"), port.number, name),
            }
            if subset:
                cluster["subset_labels"] = dict(sorted((subset.get("labels") or {}).items()))
            if policy.get("outlierDetection"):
                cluster["outlier_detection"] = _outlier_detection(policy["outlierDetection"])
            if rule:
                cluster["destination_rule"] = f"{rule.namespace}/{rule.name}"
            out.append(cluster)
    return out


def build_outbound_clusters(push: PushContext, proxy: Proxy, scope: SidecarScope) -> dict[str, Cluster]:
    clusters: dict[str, dict[str, Any]] = {}
    for service in scope.cluster_services:
        rule = push.destination_rule(proxy.namespace, proxy.labels, service)
        key = ("clusters", service.hostname, service.namespace, rule.key if rule else None)
        for cluster in push.cached(key, lambda s=service, r=rule: service_clusters(push, s, r)):
            clusters[cluster["name"]] = cluster
    # Where unmatched traffic goes: the original destination (ALLOW_ANY) or nowhere (REGISTRY_ONLY).
    clusters[PASSTHROUGH_CLUSTER] = {
        "name": PASSTHROUGH_CLUSTER, "direction": OUTBOUND, "type": "ORIGINAL_DST",
        "connection_pool": _connection_pool(None, push.connect_timeout_ms)}
    clusters[BLACKHOLE_CLUSTER] = {"name": BLACKHOLE_CLUSTER, "direction": OUTBOUND, "type": "STATIC"}
    return clusters


def build_inbound_clusters(push: PushContext, instances: list[ServiceInstance]) -> dict[str, Cluster]:
    """One per workload port: the proxy hands accepted traffic to the app on localhost."""
    clusters: dict[str, dict[str, Any]] = {}
    for inst in instances:
        name = cluster_name(INBOUND, inst.endpoint_port)
        clusters.setdefault(name, {"name": name, "direction": INBOUND, "port": inst.endpoint_port,
                                   "protocol": inst.port.protocol.value, "type": "STATIC",
                                   "connection_pool": _connection_pool(None, push.connect_timeout_ms)})
    return clusters
