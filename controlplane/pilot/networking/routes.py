"""HTTP route configs: one per outbound HTTP port (Istio's core/v1alpha3/httproute.go and route/route.go).

Each visible service on the port becomes a virtual host whose routes come from the
VirtualService for its host, or one default route when none applies. Conditions about
the caller (source labels, source namespace, port, gateways) are settled here, as Istio
settles them: the proxy only ever sees matches that can fire for its own requests.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from typing import Any

from controlplane.config.model import Resource
from controlplane.pilot.model import Protocol, Proxy, Service, matches
from controlplane.pilot.networking.push_context import MESH_GATEWAY, REGISTRY_ONLY, PushContext, SidecarScope
from controlplane.pilot.networking.util import (
    OUTBOUND,
    PASSTHROUGH_CLUSTER,
    cluster_name,
    millis,
    percent,
    pick,
)
from meshapi.config import RouteConfig
from meshapi.hosts import DEFAULT_DOMAIN, fqdn

# Istio's default retry policy for routes whose VirtualService says nothing about retries.
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")
DEFAULT_RETRIES = {"attempts": 2, "per_try_timeout_ms": 0, "retry_on": list(DEFAULT_RETRY_ON),
                   "retriable_status_codes": [503]}
NO_RETRIES = {"attempts": 0}
STRING_MATCH_KINDS = ("exact", "prefix", "regex")
REDIRECT_FIELDS = {"uri": "uri", "authority": "authority", "port": "port", "scheme": "scheme",
                   "derivePort": "derive_port", "prefixRewrite": "prefix_rewrite"}


def applies(match: dict[str, Any], proxy: Proxy, port: int) -> bool:
    """Whether a match's caller-side conditions hold for this proxy on this port; one that
    cannot hold is dropped from the proxy's config rather than sent and never taken."""
    if match.get("port") not in (None, port):
        return False
    if not matches(match.get("sourceLabels") or {}, proxy.labels):
        return False
    if match.get("sourceNamespace") not in (None, "", proxy.namespace):
        return False
    gateways = match.get("gateways")
    return not gateways or MESH_GATEWAY in gateways


def destination_cluster(push: PushContext, destination: dict[str, Any], namespace: str, port: int) -> str:
    """A destination's cluster: its port, else the service's only port, else the port the
    request came in on (Istio's rule for multi-port services)."""
    host = fqdn(destination["host"], namespace)
    number = (destination.get("port") or {}).get("number")
    if number is None:
        service = push.service_by_host.get(host)
        number = service.ports[0].number if service and len(service.ports) == 1 else port
    return cluster_name(OUTBOUND, number, destination.get("subset", ""), host)


def weighted_clusters(push: PushContext, destinations: list[dict[str, Any]], namespace: str,
                      port: int) -> list[dict[str, Any]]:
    """A lone destination takes everything; otherwise the weights as written, zeros dropped."""
    out = []
    for d in destinations:
        weight = d.get("weight") or (100 if len(destinations) == 1 else 0)
        if weight:
            entry: dict[str, Any] = {"name": destination_cluster(push, d["destination"], namespace, port),
                                     "weight": weight}
            if d.get("headers"):
                entry["headers"] = d["headers"]
            out.append(entry)
    return out


def _string_match(spec: dict[str, Any]) -> dict[str, Any]:
    """exact/prefix/regex as written; an empty match (headers, query params) means "present"."""
    return {k: spec[k] for k in STRING_MATCH_KINDS if k in spec} or {"present": True}


def translate_match(match: dict[str, Any]) -> dict[str, Any]:
    """The request-side part of an HTTPMatchRequest; header names are case-insensitive."""
    out: dict[str, Any] = {}
    for field in ("uri", "scheme", "method", "authority"):
        if isinstance(match.get(field), dict):
            out[field] = _string_match(match[field])
    for field, name, lower in (("headers", "headers", True), ("queryParams", "query_params", False),
                               ("withoutHeaders", "without_headers", True)):
        if match.get(field):
            out[name] = {(k.lower() if lower else k): _string_match(v or {})
                         for k, v in sorted(match[field].items())}
    if match.get("ignoreUriCase"):
        out["ignore_uri_case"] = True
    return out


def _catch_all(match: dict[str, Any]) -> bool:
    return not match or match == {"uri": {"prefix": "/"}}


def _retries(spec: dict[str, Any] | None) -> dict[str, Any]:
    if spec is None:
        return DEFAULT_RETRIES
    if not spec.get("attempts"):
        return NO_RETRIES
    tokens = [t.strip() for t in (spec.get("retryOn") or "").split(",") if t.strip()]
    policies = [t for t in tokens if not t.isdigit()]
    codes = [int(t) for t in tokens if t.isdigit()]
    if not tokens:
        policies, codes = list(DEFAULT_RETRY_ON), [503]
    elif codes and "retriable-status-codes" not in policies:
        policies.append("retriable-status-codes")
    out = {"attempts": spec["attempts"], "per_try_timeout_ms": millis(spec.get("perTryTimeout")),
           "retry_on": policies, "retriable_status_codes": codes}
    if spec.get("backoff"):
        out["backoff_ms"] = millis(spec["backoff"])
    return out


def _fault(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    delay, abort = spec.get("delay"), spec.get("abort")
    if delay:
        out["delay"] = {"fixed_delay_ms": millis(delay.get("fixedDelay")),
                        "percentage": percent(delay.get("percentage"), delay.get("percent"))}
    if abort:
        out["abort"] = pick(abort, {"httpStatus": "http_status", "grpcStatus": "grpc_status"})
        out["abort"]["percentage"] = percent(abort.get("percentage"))
    return out


def _mirrors(push: PushContext, rule: dict[str, Any], namespace: str, port: int) -> list[dict[str, Any]]:
    out = []
    if rule.get("mirror"):
        legacy = rule.get("mirrorPercent", rule.get("mirror_percent"))
        out.append({"cluster": destination_cluster(push, rule["mirror"], namespace, port),
                    "percentage": percent(rule.get("mirrorPercentage"), legacy)})
    for mirror in rule.get("mirrors") or []:
        out.append({"cluster": destination_cluster(push, mirror["destination"], namespace, port),
                    "percentage": percent(mirror.get("percentage"))})
    return out


def _direct_response(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": spec["status"]}
    body = spec.get("body") or {}
    if "string" in body:
        out["body"] = body["string"]
    elif "bytes" in body:
        out["body"] = base64.b64decode(body["bytes"]).decode("utf-8", "replace")
    return out


def http_route(push: PushContext, vs: Resource, rule: dict[str, Any], match: dict[str, Any],
               port: int) -> dict[str, Any]:
    """One VirtualService rule under one of its matches."""
    ns = vs.namespace
    out: dict[str, Any] = {"name": rule.get("name", ""), "virtual_service": f"{ns}/{vs.name}", "match": match}
    if rule.get("redirect"):
        redirect = rule["redirect"]
        out["redirect"] = pick(redirect, REDIRECT_FIELDS)
        out["redirect"]["redirect_code"] = redirect.get("redirectCode") or 301
    elif rule.get("directResponse"):
        out["direct_response"] = _direct_response(rule["directResponse"])
    else:
        out["clusters"] = weighted_clusters(push, rule.get("route") or [], ns, port)
        out["timeout_ms"] = millis(rule.get("timeout"))
        out["retries"] = _retries(rule.get("retries"))
        rewrite = rule.get("rewrite")
        if rewrite:
            out["rewrite"] = pick(rewrite, {"uri": "uri", "authority": "authority"})
            if rewrite.get("uriRegexRewrite"):
                out["rewrite"]["uri_regex"] = dict(rewrite["uriRegexRewrite"])
        mirrors = _mirrors(push, rule, ns, port)
        if mirrors:
            out["mirrors"] = mirrors
    if rule.get("fault"):
        out["fault"] = _fault(rule["fault"])
    if rule.get("headers"):
        out["headers"] = rule["headers"]
    if rule.get("corsPolicy"):
        out["cors"] = rule["corsPolicy"]
    return out


def virtual_service_routes(push: PushContext, proxy: Proxy, vs: Resource, port: int) -> list[dict[str, Any]]:
    """A VirtualService's HTTP rules as this proxy sees them on `port`: one route per
    applicable match, in order, stopping after the first catch-all (nothing after it can win)."""
    out: list[dict[str, Any]] = []
    for rule in vs.spec.get("http") or []:
        if rule.get("delegate"):
            continue  # delegation is for gateways' root VirtualServices; not supported yet
        if rule.get("match"):
            candidates = [translate_match(m) for m in rule["match"] if applies(m, proxy, port)]
        else:
            candidates = [{}]
        for match in candidates:
            out.append(http_route(push, vs, rule, match, port))
            if _catch_all(match):
                return out
    return out


def default_route(service: Service, port: int) -> dict[str, Any]:
    return {"name": "default", "match": {},
            "clusters": [{"name": cluster_name(OUTBOUND, port, "", service.hostname), "weight": 100}],
            "timeout_ms": 0, "retries": DEFAULT_RETRIES}


def domains(service: Service, port: int, namespace: str) -> list[str]:
    """The Host headers that mean this service: its FQDN, the Kubernetes short forms the
    caller's DNS search path resolves (the bare name only from the same namespace), its VIPs."""
    names = [service.hostname]
    if service.name and service.hostname == f"{service.name}.{service.namespace}.{DEFAULT_DOMAIN}":
        names += [f"{service.name}.{service.namespace}.svc", f"{service.name}.{service.namespace}"]
        if namespace == service.namespace:
            names.append(service.name)
    names += service.addresses
    return [d for name in names for d in (name, f"{name}:{port}")]


def fallback_virtual_host(scope: SidecarScope) -> dict[str, Any]:
    """Hosts the registry does not know: passed through (ALLOW_ANY) or refused (REGISTRY_ONLY)."""
    if scope.outbound_traffic_policy == REGISTRY_ONLY:
        return {"name": "block_all", "domains": ["*"],
                "routes": [{"name": "block_all", "match": {}, "direct_response": {"status": 502}}]}
    passthrough = [{"name": PASSTHROUGH_CLUSTER, "weight": 100}]
    return {"name": "allow_any", "domains": ["*"],
            "routes": [{"name": "allow_any", "match": {}, "clusters": passthrough, "timeout_ms": 0,
                        "retries": NO_RETRIES}]}


def is_http_port(protocol: Protocol) -> bool:
    """HTTP, or sniffed: an UNKNOWN port is routed as HTTP when its traffic turns out to be."""
    return protocol.is_http or protocol == Protocol.UNKNOWN


def build_routes(push: PushContext, proxy: Proxy, scope: SidecarScope) -> dict[str, RouteConfig]:
    """Route configs named by port ("9080"), virtual hosts in hostname order, then the fallback."""
    by_port: dict[int, list[Service]] = defaultdict(list)
    for service, ports in scope.services:
        for port in ports:
            if is_http_port(port.protocol):
                by_port[port.number].append(service)
    out = {}
    for number in sorted(by_port):
        seen: set[str] = set()
        virtual_hosts = []
        for service in by_port[number]:
            vs = scope.virtual_services.first(service.hostname)
            routes = virtual_service_routes(push, proxy, vs, number) if vs else []
            names = [d for d in domains(service, number, proxy.namespace) if d not in seen]
            seen.update(names)
            virtual_hosts.append({"name": f"{service.hostname}:{number}", "service": service.hostname,
                                  "domains": names, "routes": routes or [default_route(service, number)]})
        virtual_hosts.append(fallback_virtual_host(scope))
        out[str(number)] = {"name": str(number), "virtual_hosts": virtual_hosts}
    return out
