"""The aggregate (Istio's serviceregistry/aggregate): config-defined services and workloads from
both sources plus live registrations, as one view for pilot. A host declared by several
sources goes to the first (Kubernetes before ServiceEntries); every list is sorted, so equal
inputs give equal outputs."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Iterable

from controlplane.config.model import Resource
from controlplane.pilot.model import Endpoint, Service, matches
from controlplane.pilot.serviceregistry.kube import deployment, kube_service, kube_target, pod
from controlplane.pilot.serviceregistry.leases import Registrations
from controlplane.pilot.serviceregistry.model import SOURCES, Backing, Workload, content_digest, endpoint
from controlplane.pilot.serviceregistry.serviceentry import entry_workload, service_entries

REGISTRY_KINDS = frozenset({"Service", "ServiceEntry", "Pod", "Deployment", "WorkloadEntry"})


def compile_resources(resources: Iterable[Resource]) -> tuple[list[Backing], list[Workload]]:
    """Backings in precedence order (Kubernetes Services, then ServiceEntries) and workloads."""
    by_kind: dict[str, list[Resource]] = defaultdict(list)
    for r in resources:
        by_kind[r.kind].append(r)
    for kind in by_kind:
        by_kind[kind].sort(key=lambda r: (r.namespace, r.name))
    backings = [kube_service(r) for r in by_kind["Service"]]
    backings += [b for r in by_kind["ServiceEntry"] for b in service_entries(r)]
    workloads = [pod(r) for r in by_kind["Pod"]]
    workloads += [w for r in by_kind["Deployment"] if (w := deployment(r)) is not None]
    workloads += [entry_workload(r.spec, "WorkloadEntry", r.namespace, r.name)
                  for r in by_kind["WorkloadEntry"]]
    return backings, sorted(workloads, key=lambda w: (w.namespace, w.kind, w.name))


def _backed(b: Backing, w: Workload) -> list[Endpoint]:
    source = SOURCES[w.kind]
    if b.targets is None:
        return [endpoint(b.service, port, w, source) for port in b.service.ports]
    out = []
    for port in b.service.ports:
        number = kube_target(b.targets[port.number], port, w)
        if number:
            out.append(endpoint(b.service, port, w, source, number))
    return out


def _endpoint_key(e: Endpoint) -> tuple[int, str, int, str]:
    return e.service_port, e.address, e.port, e.source


def _winners(backings: list[Backing]) -> dict[str, Service]:
    """One Service per hostname: the first declaration wins (Kubernetes before ServiceEntries)."""
    out: dict[str, Service] = {}
    for b in backings:
        out.setdefault(b.service.hostname, b.service)
    return out


def _endpoint_index(backings: list[Backing], workloads: Iterable[Workload]) -> dict[str, list[Endpoint]]:
    """Endpoints by hostname. Declarations of a host in the winner's namespace all contribute,
    as Istio merges endpoint shards per hostname and namespace."""
    # (namespace, label, value) -> workloads: a selector looks at the workloads carrying its
    # rarest label, not at every workload of its namespace (1000 services x 3000 workloads)
    by_label: dict[tuple[str, str, str], list[Workload]] = defaultdict(list)
    for w in workloads:
        if w.address and w.labels:  # Istio: an unlabelled workload cannot be selected
            for k, v in w.labels.items():
                by_label[w.namespace, k, v].append(w)
    winners = _winners(backings)
    out: dict[str, list[Endpoint]] = defaultdict(list)
    none: list[Workload] = []
    for b in backings:
        service = b.service
        if winners[service.hostname].namespace != service.namespace:
            continue
        out[service.hostname] += b.static
        if service.selector:
            ns = service.namespace
            candidates = min((by_label.get((ns, k, v), none) for k, v in service.selector.items()), key=len)
            for w in candidates:
                if matches(service.selector, w.labels):
                    out[service.hostname] += _backed(b, w)
    return {host: sorted(eps, key=_endpoint_key) for host, eps in out.items()}


def services_from_config(resources: Iterable[Resource]) -> tuple[list[Service], list[Endpoint]]:
    """The services and endpoints config alone defines (no live registrations)."""
    backings, workloads = compile_resources(resources)
    index = _endpoint_index(backings, workloads)
    return (sorted(_winners(backings).values(), key=lambda s: s.hostname),
            [e for host in sorted(index) for e in index[host]])


class ServiceRegistry:
    """Config-defined services and workloads plus live registrations, as one view for pilot."""

    def __init__(self, registrations: Registrations | None = None) -> None:
        self.registrations = registrations if registrations is not None else Registrations()
        self._backings: list[Backing] = []
        self._workloads: list[Workload] = []
        self._services: dict[str, Service] = {}
        self._config_digest = ""
        self._index_version = ""
        self._index: dict[str, list[Endpoint]] = {}
        self.update_config([])

    def update_config(self, resources: Iterable[Resource]) -> None:
        """Replace the config-defined part (the whole set of resources, not a delta)."""
        self._backings, self._workloads = compile_resources(resources)
        self._services = dict(sorted(_winners(self._backings).items()))
        self._config_digest = content_digest([
            [[dataclasses.asdict(b.service), b.targets, [dataclasses.asdict(e) for e in b.static]]
             for b in self._backings],
            [dataclasses.asdict(w) for w in self._workloads],
        ]).hex()[:32]

    def version(self) -> str:
        """A content hash of config and registrations, O(1): equal content, equal version."""
        return hashlib.sha256(f"{self._config_digest}:{self.registrations.digest}".encode()).hexdigest()[:16]

    def services(self) -> list[Service]:
        return list(self._services.values())

    def service(self, hostname: str) -> Service | None:
        return self._services.get(hostname)

    def endpoints(self, hostname: str) -> list[Endpoint]:
        return list(self._endpoint_index().get(hostname, ()))

    def all_endpoints(self) -> list[Endpoint]:
        index = self._endpoint_index()
        return [e for host in sorted(index) for e in index[host]]

    def workload_labels(self, namespace: str) -> list[dict[str, str]]:
        """The label sets of every workload in `namespace`, Deployments' included (for subsets)."""
        labels = [dict(w.labels) for w in (*self._workloads, *self.registrations.workloads())
                  if w.namespace == namespace]
        return sorted(labels, key=lambda d: sorted(d.items()))

    def _endpoint_index(self) -> dict[str, list[Endpoint]]:
        """Rebuilt only when the content changed since the last build."""
        version = self.version()
        if version != self._index_version:
            self._index = _endpoint_index(self._backings, (*self._workloads, *self.registrations.workloads()))
            self._index_version = version
        return self._index
