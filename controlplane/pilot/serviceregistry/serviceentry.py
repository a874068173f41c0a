"""The ServiceEntry source (Istio's serviceregistry/serviceentry): ServiceEntries, one Service per
host, and WorkloadEntries (whose spec is also the shape of a ServiceEntry's endpoints)."""

from __future__ import annotations

from typing import Any

from controlplane.config.model import Resource
from controlplane.pilot.model import Endpoint, Port, Service, protocol_of
from controlplane.pilot.serviceregistry.model import (
    SERVICE_ENTRY,
    Backing,
    Workload,
    as_labels,
    as_map,
    as_port_map,
    as_seq,
    as_str,
    endpoint,
    export_scopes,
)
from meshapi.hosts import fqdn

DNS_RESOLUTIONS = ("DNS", "DNS_ROUND_ROBIN")


def service_entries(r: Resource) -> list[Backing]:
    """One Service per host, as Istio converts a ServiceEntry."""
    spec = r.spec
    ports = []
    for p in map(as_map, as_seq(spec.get("ports"))):
        number, target = p.get("number"), p.get("targetPort")
        if not isinstance(number, int):
            continue
        name = as_str(p.get("name"))
        # Istio takes a ServiceEntry port's declared protocol as written, so it outranks the name.
        ports.append(Port(name, number, protocol_of(name, app_protocol=as_str(p.get("protocol"))),
                          target_port=target if isinstance(target, int) else None))
    selector = as_labels(as_map(spec.get("workloadSelector")).get("labels"))
    resolution = as_str(spec.get("resolution")) or "NONE"
    written = [as_map(e) for e in as_seq(spec.get("endpoints"))]
    addresses = sorted(str(a) for a in as_seq(spec.get("addresses")))
    external = as_str(spec.get("location")) != "MESH_INTERNAL"  # Istio's default location is external
    export_to = export_scopes([str(e) for e in as_seq(spec.get("exportTo"))], r.namespace)
    out = []
    for host in sorted({as_str(h) for h in as_seq(spec.get("hosts"))} - {""}):
        hostname = fqdn(host, r.namespace)
        service = Service(hostname, r.namespace, list(ports), addresses=list(addresses),
                          resolution=resolution, mesh_external=external, selector=dict(selector),
                          export_to=list(export_to), source=SERVICE_ENTRY)
        static: list[Endpoint] = []
        if not selector and written:
            static = [endpoint(service, port, entry_workload(e, "", r.namespace, ""), SERVICE_ENTRY)
                      for e in written if as_str(e.get("address")) for port in ports]
        elif not selector and resolution in DNS_RESOLUTIONS and not hostname.startswith("*"):
            # Istio: a DNS entry without endpoints resolves its own host.
            static = [Endpoint(hostname, hostname, p.target_port or p.number, p.number, source=SERVICE_ENTRY)
                      for p in ports]
        out.append(Backing(service, None, static))
    return out


def entry_workload(spec: dict[str, Any], kind: str, namespace: str, name: str) -> Workload:
    """A WorkloadEntry spec, which is also the shape of a ServiceEntry endpoint."""
    weight = spec.get("weight")
    return Workload(kind, name, namespace, as_labels(spec.get("labels")), address=as_str(spec.get("address")),
                    ports=as_port_map(spec.get("ports")), locality=as_str(spec.get("locality")),
                    weight=weight if isinstance(weight, int) and weight > 0 else 1,
                    service_account=as_str(spec.get("serviceAccount")), network=as_str(spec.get("network")))
