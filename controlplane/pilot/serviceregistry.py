"""Where services and their endpoints come from: Istio's serviceregistry, over files and node agents.

Istio keeps one registry per source (kube, serviceentry) behind an aggregate controller;
zmesh does the same with config resources instead of an API server, plus the workloads
node agents register at run time (their lease is how a dead node's endpoints leave).

As in Istio, a workload - a Pod, a WorkloadEntry or a registration - backs every
Kubernetes Service whose selector matches it in its namespace, and every ServiceEntry
whose workloadSelector does. Deployments have no addresses in a manifest, so they give
no endpoints, only labels (for subsets). Sans-IO: time is passed in as `now`; every
list is sorted, so equal inputs give equal outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.config.model import Resource
from controlplane.pilot.model import Endpoint, Port, Proxy, Service, matches, protocol_of
from meshapi.hosts import fqdn

KUBERNETES = "kubernetes"
SERVICE_ENTRY = "serviceentry"
WORKLOAD_ENTRY = "workloadentry"
REGISTRATION = "registration"
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"
_DNS_RESOLUTIONS = ("DNS", "DNS_ROUND_ROBIN")
_SOURCES = {"Pod": KUBERNETES, "WorkloadEntry": WORKLOAD_ENTRY, REGISTRATION: REGISTRATION}


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
class _Backing:
    """One source's declaration of a service, and how its endpoints are found."""

    service: Service
    # Kubernetes Services: service port -> targetPort (a number or a container port name).
    # None for ServiceEntries, whose workloads map ports by service port name.
    targets: dict[int, int | str] | None
    static: list[Endpoint]             # endpoints written in the resource itself


# ---- reading resources


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


def _port_map(value: Any) -> dict[str, int]:
    return {str(k): v for k, v in _map(value).items() if isinstance(v, int) and not isinstance(v, bool)}


def _export_to(values: list[str], namespace: str) -> list[str]:
    """"." means the resource's own namespace; nothing written means everywhere."""
    return sorted({namespace if v == "." else v for v in values}) or ["*"]


def _kube_service(r: Resource) -> _Backing:
    spec = r.spec
    ports: list[Port] = []
    targets: dict[int, int | str] = {}
    for p in map(_map, _seq(spec.get("ports"))):
        number = p.get("port")
        if not isinstance(number, int) or _str(p.get("protocol")).upper() in ("UDP", "SCTP"):
            continue  # the proxy carries TCP only
        name = _str(p.get("name"))
        target = p.get("targetPort")
        if not ((isinstance(target, int) and target > 0) or (isinstance(target, str) and target)):
            target = number  # Kubernetes' default
        targets[number] = target
        ports.append(Port(name, number, protocol_of(name, app_protocol=_str(p.get("appProtocol"))),
                          target_port=target if isinstance(target, int) else None))
    hostname = fqdn(r.name, r.namespace)
    cluster_ip = _str(spec.get("clusterIP"))
    export = [e.strip() for e in r.annotations.get(EXPORT_TO_ANNOTATION, "").split(",") if e.strip()]
    service = Service(hostname, r.namespace, ports, name=r.name,
                      addresses=[cluster_ip] if cluster_ip and cluster_ip != "None" else [],
                      resolution="NONE" if cluster_ip == "None" else "STATIC",
                      selector=_labels(spec.get("selector")), export_to=_export_to(export, r.namespace),
                      source=KUBERNETES)
    static: list[Endpoint] = []
    external = _str(spec.get("externalName"))
    if _str(spec.get("type")) == "ExternalName" and external:
        # Istio: a DNS service outside the mesh whose one endpoint is the external name.
        service.resolution, service.mesh_external, service.selector = "DNS", True, {}
        static = [Endpoint(hostname, external, p.number, p.number, source=KUBERNETES) for p in ports]
    return _Backing(service, targets, static)


def _service_entries(r: Resource) -> list[_Backing]:
    """One Service per host, as Istio converts a ServiceEntry."""
    spec = r.spec
    ports = []
    for p in map(_map, _seq(spec.get("ports"))):
        number, target = p.get("number"), p.get("targetPort")
        if not isinstance(number, int):
            continue
        name = _str(p.get("name"))
        # Istio takes a ServiceEntry port's declared protocol as written, so it outranks the name.
        ports.append(Port(name, number, protocol_of(name, app_protocol=_str(p.get("protocol"))),
                          target_port=target if isinstance(target, int) else None))
    selector = _labels(_map(spec.get("workloadSelector")).get("labels"))
    resolution = _str(spec.get("resolution")) or "NONE"
    written = [_map(e) for e in _seq(spec.get("endpoints"))]
    addresses = sorted(str(a) for a in _seq(spec.get("addresses")))
    external = _str(spec.get("location")) != "MESH_INTERNAL"  # Istio's default location is external
    export_to = _export_to([str(e) for e in _seq(spec.get("exportTo"))], r.namespace)
    out = []
    for host in sorted({_str(h) for h in _seq(spec.get("hosts"))} - {""}):
        hostname = fqdn(host, r.namespace)
        service = Service(hostname, r.namespace, list(ports), addresses=list(addresses),
                          resolution=resolution, mesh_external=external, selector=dict(selector),
                          export_to=list(export_to), source=SERVICE_ENTRY)
        static: list[Endpoint] = []
        if not selector and written:
            static = [_endpoint(service, port, _entry_workload(e, "", r.namespace, ""), SERVICE_ENTRY)
                      for e in written if _str(e.get("address")) for port in ports]
        elif not selector and resolution in _DNS_RESOLUTIONS and not hostname.startswith("*"):
            # Istio: a DNS entry without endpoints resolves its own host.
            static = [Endpoint(hostname, hostname, p.target_port or p.number, p.number, source=SERVICE_ENTRY)
                      for p in ports]
        out.append(_Backing(service, None, static))
    return out


def _entry_workload(spec: dict[str, Any], kind: str, namespace: str, name: str) -> Workload:
    """A WorkloadEntry spec, which is also the shape of a ServiceEntry endpoint."""
    weight = spec.get("weight")
    return Workload(kind, name, namespace, _labels(spec.get("labels")), address=_str(spec.get("address")),
                    ports=_port_map(spec.get("ports")), locality=_str(spec.get("locality")),
                    weight=weight if isinstance(weight, int) and weight > 0 else 1,
                    service_account=_str(spec.get("serviceAccount")), network=_str(spec.get("network")))


def _pod(r: Resource) -> Workload:
    ports = {}
    for container in map(_map, _seq(r.spec.get("containers"))):
        for p in map(_map, _seq(container.get("ports"))):
            if _str(p.get("name")) and isinstance(p.get("containerPort"), int):
                ports[p["name"]] = p["containerPort"]
    return Workload("Pod", r.name, r.namespace, _labels(r.labels),
                    address=_str(_map(r.raw.get("status")).get("podIP")), ports=ports,
                    service_account=_str(r.spec.get("serviceAccountName")) or "default")


def _deployment(r: Resource) -> Workload | None:
    """The labels its pods carry; a Deployment scaled to zero has no pods to carry them."""
    if r.spec.get("replicas") == 0:
        return None
    template = _map(r.spec.get("template"))
    return Workload("Deployment", r.name, r.namespace, _labels(_map(template.get("metadata")).get("labels")),
                    service_account=_str(_map(template.get("spec")).get("serviceAccountName")) or "default")


REGISTRY_KINDS = frozenset({"Service", "ServiceEntry", "Pod", "Deployment", "WorkloadEntry"})


def _compile(resources: Iterable[Resource]) -> tuple[list[_Backing], list[Workload]]:
    """Backings in precedence order (Kubernetes Services, then ServiceEntries) and workloads."""
    by_kind: dict[str, list[Resource]] = defaultdict(list)
    for r in resources:
        by_kind[r.kind].append(r)
    for kind in by_kind:
        by_kind[kind].sort(key=lambda r: (r.namespace, r.name))
    backings = [_kube_service(r) for r in by_kind["Service"]]
    backings += [b for r in by_kind["ServiceEntry"] for b in _service_entries(r)]
    workloads = [_pod(r) for r in by_kind["Pod"]]
    workloads += [w for r in by_kind["Deployment"] if (w := _deployment(r)) is not None]
    workloads += [_entry_workload(r.spec, "WorkloadEntry", r.namespace, r.name)
                  for r in by_kind["WorkloadEntry"]]
    return backings, sorted(workloads, key=lambda w: (w.namespace, w.kind, w.name))


# ---- endpoints


def _endpoint(service: Service, port: Port, w: Workload, source: str, number: int | None = None) -> Endpoint:
    """Istio's rule for entries: the workload's port for this port name, else targetPort, else the port."""
    if number is None:
        number = w.ports.get(port.name) or port.target_port or port.number
    return Endpoint(service.hostname, w.address, number, port.number, labels=dict(w.labels),
                    locality=w.locality, weight=w.weight, service_account=w.service_account,
                    network=w.network, source=source)


def _kube_target(target: int | str, port: Port, w: Workload) -> int | None:
    """Istio's rule for a Kubernetes Service: a named targetPort must be in the workload's ports;
    a numbered one yields to a WorkloadEntry's (or registration's) port for the service port name."""
    if isinstance(target, str):
        return w.ports.get(target)
    if w.kind != "Pod" and port.name in w.ports:
        return w.ports[port.name]
    return target


def _backed(b: _Backing, w: Workload) -> list[Endpoint]:
    source = _SOURCES[w.kind]
    if b.targets is None:
        return [_endpoint(b.service, port, w, source) for port in b.service.ports]
    out = []
    for port in b.service.ports:
        number = _kube_target(b.targets[port.number], port, w)
        if number:
            out.append(_endpoint(b.service, port, w, source, number))
    return out


def _endpoint_key(e: Endpoint) -> tuple[int, str, int, str]:
    return e.service_port, e.address, e.port, e.source


def _winners(backings: list[_Backing]) -> dict[str, Service]:
    """One Service per hostname: the first declaration wins (Kubernetes before ServiceEntries)."""
    out: dict[str, Service] = {}
    for b in backings:
        out.setdefault(b.service.hostname, b.service)
    return out


def _endpoint_index(backings: list[_Backing], workloads: Iterable[Workload]) -> dict[str, list[Endpoint]]:
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
    backings, workloads = _compile(resources)
    index = _endpoint_index(backings, workloads)
    return (sorted(_winners(backings).values(), key=lambda s: s.hostname),
            [e for host in sorted(index) for e in index[host]])


def _digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()


# ---- live registrations


@dataclass
class _Registration:
    workload: Workload
    lease: float
    expires: float
    digest: int
    owners: frozenset[str]


def _registered(workload: dict[str, Any], node: str) -> Workload:
    """Check what a node agent sent: it comes over the wire, so nothing is taken on trust."""
    wid, namespace, ip = workload.get("id"), workload.get("namespace"), workload.get("ip")
    if not isinstance(wid, str) or not wid:
        raise ValueError("workload id must be a non-empty string")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"workload {wid}: namespace must be a non-empty string")
    try:
        ipaddress.ip_address(ip if isinstance(ip, str) else "")
    except ValueError:
        raise ValueError(f"workload {wid}: ip {ip!r} is not an IP address") from None
    labels, ports = workload.get("labels") or {}, workload.get("ports") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValueError(f"workload {wid}: labels must map strings to strings")
    if not isinstance(ports, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
            for k, v in ports.items()):
        raise ValueError(f"workload {wid}: ports must map names to port numbers")
    account = workload.get("service_account") or "default"
    if not isinstance(account, str):
        raise ValueError(f"workload {wid}: service_account must be a string")
    return Workload(REGISTRATION, wid, namespace, dict(labels), address=str(ip), ports=dict(ports),
                    locality=_str(workload.get("locality")), service_account=account, node=node)


def _sidecar(w: Workload) -> Proxy:
    return Proxy(w.name, w.namespace, w.address, dict(w.labels), w.service_account, w.node, w.locality)


class Registrations:
    """Workloads node agents registered, each held by its node's lease.

    A node renews all its workloads with one heartbeat; when a node dies its heartbeats
    stop and `expire` drops its workloads once their lease runs out.

    A registration belongs to the identity that filed it (its `node`: a node agent, or a proxy
    registering itself) and to the node agent such a proxy names; only they may replace, renew
    or remove it (`may_change`), so one key cannot take another's workload out of the mesh.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, _Registration] = {}
        self._by_node: dict[str, set[str]] = defaultdict(set)
        self._digest = 0  # XOR of the registrations' digests: O(1) to keep, order-independent

    def register(self, workload: dict[str, Any], node: str, now: float, lease: float,
                 agent: str = "") -> Workload:
        """Add or replace (same id: a restarted workload) a registration filed by `node`; `agent`:
        the node agent a self-registering proxy names, which may manage it too. Raises ValueError."""
        if lease <= 0:
            raise ValueError(f"lease must be positive, got {lease}")
        w = _registered(workload, node)
        self.deregister(w.name)
        digest = int.from_bytes(_digest(dataclasses.asdict(w))[:16])
        owners = frozenset(o for o in (node, agent) if o)
        self._by_id[w.name] = _Registration(w, lease, now + lease, digest, owners)
        self._by_node[node].add(w.name)
        self._digest ^= digest
        return w

    def may_change(self, wid: str, caller: str) -> bool:
        """Whether `caller` may register, renew or remove `wid` (anyone may take a free id)."""
        reg = self._by_id.get(wid)
        return reg is None or caller in reg.owners

    def heartbeat(self, node: str, now: float, ids: Iterable[str] = ()) -> int:
        """Renew every registration filed by `node`, and those of `ids` it owns; returns how many,
        so 0 tells an agent to re-register."""
        renew = set(self._by_node.get(node, ()))
        renew.update(wid for wid in ids if wid in self._by_id and node in self._by_id[wid].owners)
        for wid in renew:
            reg = self._by_id[wid]
            reg.expires = now + reg.lease
        return len(renew)

    def of_node(self, node: str) -> list[str]:
        return sorted(self._by_node.get(node, ()))

    def deregister(self, wid: str) -> bool:
        reg = self._by_id.pop(wid, None)
        if reg is None:
            return False
        node = reg.workload.node
        self._by_node[node].discard(wid)
        if not self._by_node[node]:
            del self._by_node[node]
        self._digest ^= reg.digest
        return True

    def expire(self, now: float) -> list[str]:
        """Drop the registrations whose lease ran out; returns their ids."""
        gone = sorted(wid for wid, reg in self._by_id.items() if reg.expires <= now)
        for wid in gone:
            self.deregister(wid)
        return gone

    def workloads(self) -> list[Workload]:
        return [self._by_id[wid].workload for wid in sorted(self._by_id)]

    def proxies(self) -> list[Proxy]:
        """Each registered workload's sidecar, as pilot configures it."""
        return [_sidecar(w) for w in self.workloads()]

    def proxy(self, wid: str) -> Proxy | None:
        reg = self._by_id.get(wid)
        return _sidecar(reg.workload) if reg else None

    @property
    def digest(self) -> str:
        """Changes iff the registered content does (heartbeats do not change it)."""
        return f"{self._digest:032x}"


# ---- the aggregate


class ServiceRegistry:
    """Config-defined services and workloads plus live registrations, as one view for pilot."""

    def __init__(self, registrations: Registrations | None = None) -> None:
        self.registrations = registrations if registrations is not None else Registrations()
        self._backings: list[_Backing] = []
        self._workloads: list[Workload] = []
        self._services: dict[str, Service] = {}
        self._config_digest = ""
        self._index_version = ""
        self._index: dict[str, list[Endpoint]] = {}
        self.update_config([])

    def update_config(self, resources: Iterable[Resource]) -> None:
        """Replace the config-defined part (the whole set of resources, not a delta)."""
        self._backings, self._workloads = _compile(resources)
        self._services = dict(sorted(_winners(self._backings).items()))
        self._config_digest = _digest([
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

