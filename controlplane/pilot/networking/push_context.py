"""Everything one push needs, indexed once (Istio's model.PushContext).

A PushContext is built from one consistent view of the mesh (services, endpoints, config)
and never changes afterwards: each proxy's config is a pure function of it and the proxy.
Indexes answer the questions translation asks for every proxy (which VirtualService
routes this host, which DestinationRule applies from this namespace, which Sidecar scopes
this workload), and `cached` memoises the pieces many proxies share, so a push to a
thousand proxies computes each namespace's or service's part once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from controlplane.config.model import Resource
from controlplane.pilot.model import Endpoint, Port, Proxy, Service, matches
from controlplane.pilot.networking.util import exported_to, millis
from meshapi.hosts import fqdn, host_matches
from meshapi.identity import SCHEME, spiffe_id

ROOT_NAMESPACE = "istio-system"
MESH_GATEWAY = "mesh"
ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"

T = TypeVar("T")


class HostIndex:
    """Resources by the host they apply to, answering with Istio's most specific match:
    an exact name first, then the longest wildcard (`*.example.com` before `*`)."""

    def __init__(self, entries: Iterable[tuple[str, Resource]]) -> None:
        exact: dict[str, list[Resource]] = defaultdict(list)
        wildcards: list[tuple[str, Resource]] = []
        for host, resource in entries:
            if host.startswith("*"):
                wildcards.append((host, resource))
            else:
                exact[host].append(resource)
        self.exact = dict(exact)
        # sorted() is stable: resources of equal specificity keep their precedence order
        self.wildcards = sorted(wildcards, key=lambda e: -len(e[0]))

    def first(self, hostname: str, accept: Callable[[Resource], bool] = lambda r: True) -> Resource | None:
        for resource in self.exact.get(hostname, ()):
            if accept(resource):
                return resource
        for pattern, resource in self.wildcards:
            if host_matches(pattern, hostname) and accept(resource):
                return resource
        return None


@dataclass(frozen=True)
class EgressHost:
    """One Sidecar egress `namespace/host` entry, with `.` already resolved."""

    namespace: str              # a namespace, `*` for any, `~` for none
    host: str                   # an FQDN or a wildcard
    port: int | None            # the egress listener's port, if it names one

    def allows(self, namespace: str, hostname: str, port: int | None) -> bool:
        if self.namespace not in ("*", namespace):  # `~` is never a namespace: it imports nothing
            return False
        if port is not None and self.port is not None and port != self.port:
            return False
        return host_matches(self.host, hostname)


@dataclass(frozen=True)
class SidecarScope:
    """What one proxy may reach (Istio's SidecarScope): its services, ports and VirtualServices."""

    sidecar: Resource | None                # None: no Sidecar applies, the proxy sees everything exported
    outbound_traffic_policy: str
    services: tuple[tuple[Service, tuple[Port, ...]], ...]
    virtual_services: HostIndex             # mesh-bound VirtualServices the proxy may use
    cluster_services: tuple[Service, ...]   # services plus VirtualService destinations


@dataclass(frozen=True)
class ServiceInstance:
    """A service port that a proxy's own workload serves: what its inbound side listens for."""

    service: Service
    port: Port
    endpoint_port: int


def _selector(resource: Resource, field: str = "matchLabels") -> dict[str, str]:
    selector = resource.spec.get("workloadSelector") or resource.spec.get("selector") or {}
    return selector.get(field) or {}


def _precedence(resource: Resource) -> tuple[str, str, str]:
    """Istio ranks equals by creation time; zmesh has none, so namespace/name decides (and
    content, between two copies of one name, so the input's order never shows in the output)."""
    return resource.namespace, resource.name, resource.content_hash


class PushContext:
    """Immutable indexes over services, endpoints and Istio config for one push.

    `mesh_config` takes Istio's MeshConfig names: rootNamespace (istio-system), trustDomain
    (cluster.local), enableAutoMtls (true), connectTimeout (10s), outboundTrafficPolicy.mode
    (ALLOW_ANY), pathNormalization.normalization (DEFAULT, which is BASE).
    """

    def __init__(self, services: Iterable[Service], endpoints: Iterable[Endpoint],
                 resources: Iterable[Resource], mesh_config: dict[str, Any] | None = None) -> None:
        mesh = mesh_config or {}
        self.root_namespace: str = mesh.get("rootNamespace", ROOT_NAMESPACE)
        self.trust_domain: str = mesh.get("trustDomain", "cluster.local")
        self.enable_auto_mtls: bool = mesh.get("enableAutoMtls", True)
        self.connect_timeout_ms = millis(mesh.get("connectTimeout"), 10_000)
        self.outbound_traffic_policy: str = (mesh.get("outboundTrafficPolicy") or {}).get("mode", ALLOW_ANY)
        normalization = (mesh.get("pathNormalization") or {}).get("normalization", "DEFAULT")
        self.path_normalization: str = "BASE" if normalization == "DEFAULT" else normalization

        self.services: tuple[Service, ...] = tuple(sorted(services, key=lambda s: (s.hostname, s.namespace)))
        self.service_by_host: dict[str, Service] = {}
        by_namespace: dict[str, list[Service]] = defaultdict(list)
        for service in self.services:
            self.service_by_host.setdefault(service.hostname, service)
            by_namespace[service.namespace].append(service)
        self.services_by_namespace = dict(by_namespace)
        # namespace -> one (key, value) of each selector -> services: a proxy's instances are
        # found from its own labels, not by testing every selector in its namespace
        by_label: dict[str, dict[tuple[str, str], list[Service]]] = defaultdict(lambda: defaultdict(list))
        for service in self.services:
            if service.selector:
                by_label[service.namespace][min(service.selector.items())].append(service)
        self._selecting = {ns: dict(index) for ns, index in by_label.items()}

        by_port: dict[tuple[str, int], list[Endpoint]] = defaultdict(list)
        by_address: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in endpoints:
            by_port[ep.hostname, ep.service_port].append(ep)
            by_address[ep.address].append(ep)
        self.endpoints_by_address = dict(by_address)
        self.endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {
            key: tuple(sorted(eps, key=lambda e: (e.address, e.port))) for key, eps in by_port.items()}

        by_kind: dict[str, list[Resource]] = defaultdict(list)
        for r in sorted(resources, key=_precedence):
            by_kind[r.kind].append(r)
        self._index_virtual_services(by_kind["VirtualService"])
        self._index_destination_rules(by_kind["DestinationRule"])
        sidecars: dict[str, tuple[list[Resource], list[Resource]]] = defaultdict(lambda: ([], []))
        for sidecar in by_kind["Sidecar"]:
            sidecars[sidecar.namespace][0 if _selector(sidecar, "labels") else 1].append(sidecar)
        self.sidecars = dict(sidecars)  # namespace -> (workload-selecting, namespace-wide)
        self.peer_authentications = self._by_namespace(by_kind["PeerAuthentication"])
        self.authorization_policies = self._by_namespace(
            r for r in by_kind["AuthorizationPolicy"]
            if not r.spec.get("targetRef") and not r.spec.get("targetRefs"))  # gateway/waypoint only
        self._memo: dict[Any, Any] = {}
        # Does the outbound side read proxy labels anywhere? Only VS sourceLabels matches (mesh
        # wide) and selecting Sidecars / DestinationRules (per namespace) do.
        self._source_labels = any(
            isinstance(m, dict) and m.get("sourceLabels")
            for vs in by_kind["VirtualService"] for kind in ("http", "tcp", "tls")
            for route in vs.spec.get(kind) or [] if isinstance(route, dict)
            for m in route.get("match") or [])

    def outbound_key(self, proxy: Proxy) -> tuple[Any, ...]:
        """What a proxy's outbound config depends on: its namespace, and its labels only where
        some resource selects by them, so a fleet of apps in one namespace shares one build."""
        label_sensitive = (self._source_labels or bool(self.sidecars.get(proxy.namespace, ([], []))[0])
                           or proxy.namespace in self._selected_drs)
        return (proxy.namespace, tuple(sorted(proxy.labels.items())) if label_sensitive else ())

    # -- indexes -----------------------------------------------------------------------------

    def _index_virtual_services(self, virtual_services: list[Resource]) -> None:
        """One host index per gateway a VirtualService binds to; `mesh` is every sidecar."""
        bound: dict[str, list[tuple[str, Resource]]] = defaultdict(list)
        for vs in virtual_services:
            for gateway in vs.spec.get("gateways") or [MESH_GATEWAY]:
                name = gateway if gateway == MESH_GATEWAY or "/" in gateway else f"{vs.namespace}/{gateway}"
                bound[name] += [(fqdn(h, vs.namespace), vs) for h in vs.spec.get("hosts") or []]
        self.virtual_services_by_gateway: dict[str, list[tuple[str, Resource]]] = dict(bound)

    def _index_destination_rules(self, rules: list[Resource]) -> None:
        """Per namespace: rules for every proxy there, and rules only for selected workloads."""
        plain: dict[str, list[tuple[str, Resource]]] = defaultdict(list)
        selected: dict[str, list[tuple[str, Resource]]] = defaultdict(list)
        for dr in rules:
            host = dr.spec.get("host")
            if isinstance(host, str):
                (selected if _selector(dr) else plain)[dr.namespace].append((fqdn(host, dr.namespace), dr))
        self._drs = {ns: HostIndex(entries) for ns, entries in plain.items()}
        self._selected_drs = {ns: HostIndex(entries) for ns, entries in selected.items()}

    @staticmethod
    def _by_namespace(policies: Iterable[Resource]) -> dict[str, list[Resource]]:
        out: dict[str, list[Resource]] = defaultdict(list)
        for p in policies:
            out[p.namespace].append(p)
        return dict(out)

    def cached(self, key: Any, build: Callable[[], T]) -> T:
        """Memoise a piece many proxies share; callers treat the result as read-only."""
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = build()
            return value

    # -- lookups -----------------------------------------------------------------------------

    def destination_rule(self, namespace: str, labels: dict[str, str], service: Service) -> Resource | None:
        """Istio's lookup order: the proxy's namespace (workload-selected rules first), then
        the service's namespace, then the root namespace, each only if exported to the proxy."""
        host = service.hostname
        local = self._selected_drs.get(namespace)
        hit = local.first(host, lambda r: matches(_selector(r), labels)) if local else None
        if hit is None and namespace in self._drs:
            hit = self._drs[namespace].first(host)
        for owner in (service.namespace, self.root_namespace):
            if hit is None and owner != namespace and owner in self._drs:
                hit = self._drs[owner].first(
                    host, lambda r: exported_to(r.namespace, r.spec.get("exportTo"), namespace))
        return hit

    def sidecar(self, proxy: Proxy) -> Resource | None:
        """The Sidecar for a proxy: one selecting its labels, else its namespace's default,
        else the root namespace's default."""
        selected, default = self.sidecars.get(proxy.namespace, ([], []))
        for sidecar in selected:
            if matches(_selector(sidecar, "labels"), proxy.labels):
                return sidecar
        if default:
            return default[0]
        root = self.sidecars.get(self.root_namespace)
        return root[1][0] if root and root[1] else None

    def sidecar_scope(self, proxy: Proxy) -> SidecarScope:
        sidecar = self.sidecar(proxy)
        return self.cached(("scope", sidecar.key if sidecar else None, proxy.namespace),
                           lambda: self._build_scope(sidecar, proxy.namespace))

    def _build_scope(self, sidecar: Resource | None, namespace: str) -> SidecarScope:
        egress: list[EgressHost] = []
        spec = sidecar.spec if sidecar else {}
        for listener in spec.get("egress") or []:
            port = (listener.get("port") or {}).get("number")
            for entry in listener.get("hosts") or []:
                ns, _, host = entry.partition("/")
                egress.append(EgressHost(namespace if ns == "." else ns, host, port))
        mode = (spec.get("outboundTrafficPolicy") or {}).get("mode", self.outbound_traffic_policy)

        def allowed(ns: str, host: str, port: int | None = None) -> bool:
            return not egress or any(e.allows(ns, host, port) for e in egress)

        services = []
        for svc in self.services:
            if exported_to(svc.namespace, svc.export_to, namespace):
                ports = tuple(p for p in svc.ports if allowed(svc.namespace, svc.hostname, p.number))
                if ports:
                    services.append((svc, ports))
        vs_entries = [(host, vs) for host, vs in self.virtual_services_by_gateway.get(MESH_GATEWAY, ())
                      if exported_to(vs.namespace, vs.spec.get("exportTo"), namespace)
                      and allowed(vs.namespace, host)]
        # Istio gives clusters to services a visible VirtualService routes to, imported or not.
        cluster_services = {svc.hostname: svc for svc, _ in services}
        for _, vs in vs_entries:
            for host in destination_hosts(vs):
                svc = self.service_by_host.get(host)
                if svc is not None and exported_to(svc.namespace, svc.export_to, namespace):
                    cluster_services.setdefault(host, svc)
        return SidecarScope(sidecar, mode, tuple(services), HostIndex(vs_entries),
                            tuple(cluster_services[h] for h in sorted(cluster_services)))

    def instances(self, proxy: Proxy) -> list[ServiceInstance]:
        """The service ports the proxy's workload serves: endpoints at its address, plus
        selector-matched services of its namespace (a workload not yet in the registry)."""
        found: dict[tuple[str, int], ServiceInstance] = {}
        for ep in self.endpoints_by_address.get(proxy.ip, ()):
            svc = self.service_by_host.get(ep.hostname)
            port = svc.port(ep.service_port) if svc else None
            if svc and port:
                found.setdefault((svc.hostname, port.number), ServiceInstance(svc, port, ep.port))
        index = self._selecting.get(proxy.namespace, {})
        for svc in (svc for item in proxy.labels.items() for svc in index.get(item, ())):
            if matches(svc.selector, proxy.labels):
                for port in svc.ports:
                    found.setdefault((svc.hostname, port.number),
                                     ServiceInstance(svc, port, port.target_port or port.number))
        return [found[k] for k in sorted(found)]

    def service_accounts(self, service: Service) -> list[str]:
        """SPIFFE identities behind a service: the SANs its clients verify under ISTIO_MUTUAL."""
        def build() -> list[str]:
            ids = {self.spiffe_id(ep.service_account, service.namespace)
                   for p in service.ports for ep in self.endpoints.get((service.hostname, p.number), ())
                   if ep.service_account}
            return sorted(ids)
        return self.cached(("sans", service.hostname), build)

    def spiffe_id(self, service_account: str, namespace: str) -> str:
        if service_account.startswith(SCHEME):
            return service_account
        return spiffe_id(self.trust_domain, namespace, service_account)


def destination_hosts(vs: Resource) -> list[str]:
    """Every destination host of a VirtualService, resolved in its namespace."""
    hosts = []
    for section in ("http", "tcp", "tls"):
        for rule in vs.spec.get(section) or []:
            targets = [d.get("destination") for d in rule.get("route") or []]
            targets += [rule.get("mirror")] + [m.get("destination") for m in rule.get("mirrors") or []]
            hosts += [fqdn(t["host"], vs.namespace) for t in targets if isinstance(t, dict) and t.get("host")]
    return hosts
