"""Endpoints: the addresses behind each cluster (Istio's EDS, pilot/pkg/xds/endpoints).

A subset cluster gets only the endpoints whose labels carry the subset's labels. Each
endpoint says whether it runs a sidecar (`tls_mode`), which is what auto mTLS needs,
and whose identity it has, which is what the caller's SAN check needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.pilot.model import Service, matches
from controlplane.pilot.networking.push_context import PushContext
from controlplane.pilot.networking.util import INBOUND
from meshapi.config import Cluster, Endpoint

TLS_MODE_LABEL = "security.istio.io/tlsMode"
LOCALHOST = "127.0.0.1"


def service_endpoints(push: PushContext, service: Service, port: int,
                      subset_labels: dict[str, str]) -> list[dict[str, Any]]:
    """One service port's endpoints, filtered by subset labels, in address order."""
    tls_default = "disabled" if service.mesh_external else "istio"
    found = [{
        "address": ep.address, "port": ep.port, "weight": ep.weight, "locality": ep.locality,
        "healthy": ep.healthy, "labels": dict(sorted(ep.labels.items())),
        "service_account": ep.service_account and push.spiffe_id(ep.service_account, service.namespace),
        "tls_mode": ep.labels.get(TLS_MODE_LABEL, tls_default),
    } for ep in push.endpoints.get((service.hostname, port), ()) if matches(subset_labels, ep.labels)]
    dns = service.resolution in ("DNS", "DNS_ROUND_ROBIN") and not service.hostname.startswith("*")
    if not found and dns:
        # A DNS ServiceEntry without endpoints is reached at its own name (as Istio does).
        target = service.port(port)
        found.append(_endpoint(service.hostname, (target and target.target_port) or port, tls_default))
    return found


def _endpoint(address: str, port: int, tls_mode: str) -> dict[str, Any]:
    return {"address": address, "port": port, "weight": 1, "locality": "", "healthy": True, "labels": {},
            "service_account": "", "tls_mode": tls_mode}


def build_endpoints(push: PushContext, clusters: Mapping[str, Cluster]) -> dict[str, list[Endpoint]]:
    """Endpoints for every cluster that has its own (all but ORIGINAL_DST ones)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, cluster in clusters.items():
        if cluster["type"] == "ORIGINAL_DST":
            continue
        if cluster["direction"] == INBOUND:
            out[name] = [_endpoint(LOCALHOST, cluster["port"], "disabled")]
            continue
        service = push.service_by_host.get(cluster.get("service", ""))
        if service is None:
            out[name] = []
            continue
        labels = cluster.get("subset_labels") or {}
        key = ("endpoints", service.hostname, cluster["port"], tuple(labels.items()))
        out[name] = push.cached(key, lambda s=service, p=cluster["port"], lb=labels:
                                service_endpoints(push, s, p, lb))
    return out
