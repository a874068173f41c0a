"""The Kubernetes source (Istio's serviceregistry/kube): Services, Pods and Deployments from
config resources instead of an API server."""

from __future__ import annotations

from controlplane.config.model import Resource
from controlplane.pilot.model import Endpoint, Port, Service, protocol_of
from controlplane.pilot.serviceregistry.model import (
    KUBERNETES,
    Backing,
    Workload,
    as_labels,
    as_map,
    as_seq,
    as_str,
    export_scopes,
)
from meshapi.hosts import fqdn

EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"


def kube_service(r: Resource) -> Backing:
    spec = r.spec
    ports: list[Port] = []
    targets: dict[int, int | str] = {}
    for p in map(as_map, as_seq(spec.get("ports"))):
        number = p.get("port")
        if not isinstance(number, int) or as_str(p.get("protocol")).upper() in ("UDP", "SCTP"):
            continue  # the proxy carries TCP only
        name = as_str(p.get("name"))
        target = p.get("targetPort")
        if not ((isinstance(target, int) and target > 0) or (isinstance(target, str) and target)):
            target = number  # Kubernetes' default
        targets[number] = target
        ports.append(Port(name, number, protocol_of(name, app_protocol=as_str(p.get("appProtocol"))),
                          target_port=target if isinstance(target, int) else None))
    hostname = fqdn(r.name, r.namespace)
    cluster_ip = as_str(spec.get("clusterIP"))
    export = [e.strip() for e in r.annotations.get(EXPORT_TO_ANNOTATION, "").split(",") if e.strip()]
    service = Service(hostname, r.namespace, ports, name=r.name,
                      addresses=[cluster_ip] if cluster_ip and cluster_ip != "None" else [],
                      resolution="NONE" if cluster_ip == "None" else "STATIC",
                      selector=as_labels(spec.get("selector")), export_to=export_scopes(export, r.namespace),
                      source=KUBERNETES)
    static: list[Endpoint] = []
    external = as_str(spec.get("externalName"))
    if as_str(spec.get("type")) == "ExternalName" and external:
        # Istio: a DNS service outside the mesh whose one endpoint is the external name.
        service.resolution, service.mesh_external, service.selector = "DNS", True, {}
        static = [Endpoint(hostname, external, p.number, p.number, source=KUBERNETES) for p in ports]
    return Backing(service, targets, static)


def pod(r: Resource) -> Workload:
    ports = {}
    for container in map(as_map, as_seq(r.spec.get("containers"))):
        for p in map(as_map, as_seq(container.get("ports"))):
            if as_str(p.get("name")) and isinstance(p.get("containerPort"), int):
                ports[p["name"]] = p["containerPort"]
    return Workload("Pod", r.name, r.namespace, as_labels(r.labels),
                    address=as_str(as_map(r.raw.get("status")).get("podIP")), ports=ports,
                    service_account=as_str(r.spec.get("serviceAccountName")) or "default")


def deployment(r: Resource) -> Workload | None:
    """The labels its pods carry; a Deployment scaled to zero has no pods to carry them."""
    if r.spec.get("replicas") == 0:
        return None
    template = as_map(r.spec.get("template"))
    labels = as_labels(as_map(template.get("metadata")).get("labels"))
    account = as_str(as_map(template.get("spec")).get("serviceAccountName")) or "default"
    return Workload("Deployment", r.name, r.namespace, labels, service_account=account)


def kube_target(target: int | str, port: Port, w: Workload) -> int | None:
    """Istio's rule for a Kubernetes Service: a named targetPort must be in the workload's ports;
    a numbered one yields to a WorkloadEntry's (or registration's) port for the service port name."""
    if isinstance(target, str):
        return w.ports.get(target)
    if w.kind != "Pod" and port.name in w.ports:
        return w.ports[port.name]
    return target
