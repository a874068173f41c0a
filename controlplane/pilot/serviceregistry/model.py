"""What every source of the registry shares: workloads, backings, the sources' names, and how a
workload serving a service port becomes an endpoint. Resources are read tolerantly (as_*):
validation is galley's job, and a field of the wrong type reads as absent."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from controlplane.pilot.model import Endpoint, Port, Service

KUBERNETES = "kubernetes"
SERVICE_ENTRY = "serviceentry"
WORKLOAD_ENTRY = "workloadentry"
REGISTRATION = "registration"
SOURCES = {"Pod": KUBERNETES, "WorkloadEntry": WORKLOAD_ENTRY, REGISTRATION: REGISTRATION}


@dataclass
class Workload:
    """Something that runs and may back services; a Deployment's has labels but no address."""

    kind: str                          # Pod | Deployment | WorkloadEntry | registration
    name: str                          # a registration's id
    namespace: str
    labels: dict[str, str]
    address: str = ""
    # Pods: container port name -> number (for named targetPorts); WorkloadEntries and
    # registrations: service port name -> the port this workload serves it on.
    ports: dict[str, int] = field(default_factory=dict)
    locality: str = ""
    weight: int = 1
    service_account: str = ""
    network: str = ""
    node: str = ""


@dataclass
class Backing:
    """One source's declaration of a service, and how its endpoints are found."""

    service: Service
    # Kubernetes Services: service port -> targetPort (a number or a container port name).
    # None for ServiceEntries, whose workloads map ports by service port name.
    targets: dict[int, int | str] | None
    static: list[Endpoint]             # endpoints written in the resource itself


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def as_labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in as_map(value).items()}


def as_port_map(value: Any) -> dict[str, int]:
    return {str(k): v for k, v in as_map(value).items() if isinstance(v, int) and not isinstance(v, bool)}


def export_scopes(values: list[str], namespace: str) -> list[str]:
    """"." means the resource's own namespace; nothing written means everywhere."""
    return sorted({namespace if v == "." else v for v in values}) or ["*"]


def endpoint(service: Service, port: Port, w: Workload, source: str, number: int | None = None) -> Endpoint:
    """Istio's rule for entries: the workload's port for this port name, else targetPort, else the port."""
    if number is None:
        number = w.ports.get(port.name) or port.target_port or port.number
    return Endpoint(service.hostname, w.address, number, port.number, labels=dict(w.labels),
                    locality=w.locality, weight=w.weight, service_account=w.service_account,
                    network=w.network, source=source)


def content_digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
