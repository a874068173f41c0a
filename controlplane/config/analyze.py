"""Cross-resource analysis: the mistakes no single resource shows on its own.

Schema validation checks one resource at a time; these analyzers check resources
against each other (a route to a host no Service or ServiceEntry defines, a subset no
DestinationRule declares, a selector no workload carries). Messages carry Istio's code,
name, level and wording (istio/istio pkg/config/analysis/msg/messages.yaml) and follow
the conditions of Istio's analyzers (pkg/config/analysis/analyzers), so a user can
search for them. Sans-IO: pure functions over loaded resources.

Workloads are what the files show: Deployments (their pod template), Pods and
WorkloadEntries. Without a MeshConfig, the root namespace is Istio's default.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.config.diagnostics import ERROR, INFO, WARNING, Diagnostic, format_path
from controlplane.config.model import Key, Resource
from controlplane.config.yamlload import Path
from meshapi import hosts as hostnames
from meshapi.hosts import host_matches

ROOT_NAMESPACE = "istio-system"
MESH_GATEWAY = "mesh"
# Labels Istio adds to endpoints from their node and cluster; files cannot show them, so a
# subset selecting on them is not held against it.
TOPOLOGY_LABELS = frozenset({
    "topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone",
    "kubernetes.io/hostname", "topology.istio.io/network", "topology.istio.io/cluster",
})


@dataclass(frozen=True)
class Message:
    """One of Istio's analysis message types: `template` takes str.format arguments."""

    code: str
    name: str
    level: str
    template: str


REFERENCED_RESOURCE_NOT_FOUND = Message("IST0101", "ReferencedResourceNotFound", ERROR,
                                        "Referenced {} not found: {}")
CONFLICTING_MESH_GATEWAY_HOSTS = Message(
    "IST0109", "ConflictingMeshGatewayVirtualServiceHosts", ERROR,
    "The VirtualServices {} associated with mesh gateway define the same host {} which can lead to "
    "undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single "
    "resource.")
CONFLICTING_SIDECAR_SELECTORS = Message(
    "IST0110", "ConflictingSidecarWorkloadSelectors", ERROR,
    "The Sidecars {} in namespace {} select the same workload pod {}, which can lead to undefined behavior.")
MULTIPLE_SIDECARS_WITHOUT_SELECTORS = Message(
    "IST0111", "MultipleSidecarsWithoutWorkloadSelectors", ERROR,
    "The Sidecars {} in namespace {} have no workload selector, which can lead to undefined behavior.")
DESTINATION_PORT_SELECTOR_REQUIRED = Message(
    "IST0112", "VirtualServiceDestinationPortSelectorRequired", ERROR,
    "This VirtualService routes to a service {} that exposes multiple ports {}. "
    "Specifying a port in the destination is required to disambiguate.")
NO_MATCHING_WORKLOADS = Message("IST0127", "NoMatchingWorkloadsFound", WARNING,
                                "No matching workloads for this resource with the following labels: {}")
UNREACHABLE_RULE = Message("IST0130", "VirtualServiceUnreachableRule", WARNING,
                           "VirtualService rule {} not used ({}).")
INEFFECTIVE_MATCH = Message(
    "IST0131", "VirtualServiceIneffectiveMatch", INFO,
    "VirtualService rule {} match {} is not used (duplicate/overlapping match in rule {}).")
HOST_NOT_IN_GATEWAY = Message("IST0132", "VirtualServiceHostNotFoundInGateway", WARNING,
                              "one or more host {} defined in VirtualService {} not found in Gateway {}.")
ADDRESSES_REQUIRED = Message("IST0134", "ServiceEntryAddressesRequired", WARNING,
                             "ServiceEntry addresses are required for this protocol.")
INEFFECTIVE_POLICY = Message("IST0167", "IneffectivePolicy", WARNING, "The policy has no impact: {}.")
SUBSET_SELECTS_NO_PODS = Message(
    "IST0173", "DestinationRuleSubsetNotSelectPods", ERROR,
    "The Subset {} defined in the DestinationRule does not select any pods. "
    "Which may lead to 503 UH (NoHealthyUpstream).")
UNKNOWN_DESTINATION_RULE_HOST = Message(
    "IST0174", "UnknownDestinationRuleHost", WARNING,
    "The host {} defined in the DestinationRule does not match any services in the mesh.")
# zmesh's own, shared with galley and `meshctl apply`: which of two definitions of one resource
# holds is undefined, so analyze reads the first, and galley and apply refuse the second.
DUPLICATE_RESOURCE = Message("ZM0002", "DuplicateResource", ERROR, "{} is also defined in {}; {}")
ANALYZED_FIRST = "only the first definition is analyzed"


# --- reading specs as written: analysis must not trip over a field schema validation reports ------

def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


def _strs(value: Any) -> list[str]:
    return [v for v in _seq(value) if isinstance(v, str)]


def _go_list(items: Iterable[object]) -> str:
    """Go's %v of a slice, as Istio's messages print them: [a b]."""
    return "[" + " ".join(str(i) for i in items) + "]"


def _quote(text: str) -> str:
    """Go's %q."""
    return json.dumps(text, ensure_ascii=False)


def _selector_string(selector: dict[str, str]) -> str:
    """Kubernetes' label selector syntax, as Istio prints selectors."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _export_scopes(namespace: str, export_to: list[str]) -> list[str]:
    """Where a resource is visible: "*" for everywhere, else namespaces ("." is its own)."""
    if not export_to or "*" in export_to:
        return ["*"]
    return sorted({namespace if e == "." else e for e in export_to})


def _report(message: Message, r: Resource, path: Path, *args: object) -> Diagnostic:
    """A message about `r` at `path`; one about the whole resource points at its name."""
    line = r.line_of(path) if path else r.line_of(("metadata", "name"))
    return Diagnostic(message.level, message.code, message.name, message.template.format(*args),
                      file=r.file, line=line, kind=r.kind, namespace=r.namespace, resource=r.name,
                      path=format_path(path))


# --- the mesh as the files describe it ------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    kind: str
    namespace: str
    name: str
    labels: dict[str, str]
    ambient: bool  # captured by ztunnel: no sidecar for Sidecar resources to configure


@dataclass(frozen=True)
class HostEntry:
    """A host the mesh can route to, from a Kubernetes Service or a ServiceEntry."""

    scope: str  # "*" or the one namespace it is visible in
    fqdn: str
    ports: tuple[int, ...]
    resource: Resource


def _ambient(labels: dict[str, str], annotations: dict[str, str]) -> bool:
    return (labels.get("istio.io/dataplane-mode") == "ambient"
            or annotations.get("ambient.istio.io/redirection") == "enabled")


def _workloads(resources: list[Resource]) -> list[Workload]:
    out = []
    for r in resources:
        if r.kind == "Deployment":
            meta = _map(_map(r.spec.get("template")).get("metadata"))
            labels, annotations = _labels(meta.get("labels")), _labels(meta.get("annotations"))
        elif r.kind == "Pod":
            labels, annotations = _labels(r.labels), _labels(r.annotations)
        elif r.kind == "WorkloadEntry":
            labels, annotations = _labels(r.spec.get("labels")), _labels(r.annotations)
        else:
            continue
        out.append(Workload(r.kind, r.namespace, r.name, labels, _ambient(labels, annotations)))
    return out


def _ports(items: Any, number_field: str) -> tuple[int, ...]:
    return tuple(p[number_field] for p in map(_map, _seq(items)) if isinstance(p.get(number_field), int))


class Mesh:
    """Indexes over the resources, built once for every analyzer."""

    def __init__(self, resources: list[Resource]) -> None:
        self.resources = resources
        self.by_kind: dict[str, list[Resource]] = defaultdict(list)
        for r in resources:
            self.by_kind[r.kind].append(r)
        self.workloads = _workloads(resources)
        self.namespaces = {r.name: r for r in self.by_kind["Namespace"]}
        self.gateways = {(r.namespace, r.name): r for r in self.by_kind["Gateway"]}
        # Istio's service-entry host map: Services are added after ServiceEntries and win.
        self.hosts: dict[tuple[str, str], HostEntry] = {}
        for se in self.by_kind["ServiceEntry"]:
            scopes = _export_scopes(se.namespace, _strs(se.spec.get("exportTo")))
            ports = _ports(se.spec.get("ports"), "number")
            for host in _strs(se.spec.get("hosts")):
                for scope in scopes:
                    fqdn = hostnames.fqdn(host, se.namespace)
                    self.hosts[scope, fqdn] = HostEntry(scope, fqdn, ports, se)
        for svc in self.by_kind["Service"]:
            export = _labels(svc.annotations).get("networking.istio.io/exportTo", "")
            fqdn = hostnames.fqdn(svc.name, svc.namespace)
            for scope in _export_scopes(svc.namespace, [e.strip() for e in export.split(",") if e.strip()]):
                self.hosts[scope, fqdn] = HostEntry(scope, fqdn, _ports(svc.spec.get("ports"), "port"), svc)

    def of_kind(self, *kinds: str) -> list[Resource]:
        return [r for kind in kinds for r in self.by_kind[kind]]

    def lookup(self, namespace: str, export_to: list[str], host: str) -> HostEntry | None:
        """The Service or ServiceEntry a config in `namespace` reaches as `host` (GetDestinationHost)."""
        fqdn = hostnames.fqdn(host, namespace)
        scopes = ["*"] + [namespace if e == "." else e for e in (export_to or [namespace])]
        for scope in scopes:
            if (scope, fqdn) in self.hosts:
                return self.hosts[scope, fqdn]
        bare = host[1:] if host.startswith("*") else host
        wildcards = (e for e in self.hosts.values() if e.fqdn.startswith("*") and e.scope in ("*", namespace))
        return next((e for e in wildcards if bare.endswith(e.fqdn[1:])), None)

    def selected(self, selector: dict[str, str], namespace: str | None) -> list[Workload]:
        """Workloads in `namespace` (None: anywhere) whose labels `selector` matches."""
        return [w for w in self.workloads
                if (namespace is None or w.namespace == namespace) and _selects(selector, w.labels)]

    def backends(self, entry: HostEntry) -> list[dict[str, str]] | None:
        """The label sets of a host's endpoints; None where the files cannot tell."""
        r = entry.resource
        if r.kind == "Service":
            selector = _labels(r.spec.get("selector"))
            return [w.labels for w in self.selected(selector, r.namespace)] if selector else None
        selector = _labels(_map(r.spec.get("workloadSelector")).get("labels"))
        if selector:
            return [w.labels for w in self.selected(selector, r.namespace)]
        endpoints = [_labels(e.get("labels")) for e in map(_map, _seq(r.spec.get("endpoints")))]
        return endpoints or None

    def services_of(self, workload: Workload) -> list[Resource]:
        return [s for s in self.by_kind["Service"]
                if s.namespace == workload.namespace and (sel := _labels(s.spec.get("selector")))
                and _selects(sel, workload.labels)]


# --- VirtualService -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Destination:
    path: Path         # of the destination object
    destination: dict[str, Any]
    mirror: bool


def _destinations(vs: Resource) -> Iterator[_Destination]:
    for section in ("tcp", "tls", "http"):
        for i, route in enumerate(_seq(vs.spec.get(section))):
            for j, weighted in enumerate(_seq(_map(route).get("route"))):
                yield _Destination(("spec", section, i, "route", j, "destination"),
                                   _map(_map(weighted).get("destination")), False)
    for i, route in enumerate(map(_map, _seq(vs.spec.get("http")))):
        if isinstance(route.get("mirror"), dict):
            yield _Destination(("spec", "http", i, "mirror"), route["mirror"], True)
        for j, mirror in enumerate(_seq(route.get("mirrors"))):
            yield _Destination(("spec", "http", i, "mirrors", j, "destination"),
                               _map(_map(mirror).get("destination")), True)


def _subset_defined(mesh: Mesh, namespace: str, host: str, subset: str) -> bool:
    fqdn = hostnames.fqdn(host, namespace)
    for dr in mesh.by_kind["DestinationRule"]:
        dr_host = dr.spec.get("host")
        scopes = _export_scopes(dr.namespace, _strs(dr.spec.get("exportTo")))
        if not isinstance(dr_host, str) or not ("*" in scopes or namespace in scopes):
            continue
        dr_fqdn = hostnames.fqdn(dr_host, dr.namespace)
        applies = dr_fqdn == fqdn or (dr_fqdn.startswith("*") and host_matches(dr_fqdn, fqdn))
        if applies and any(_map(s).get("name") == subset for s in _seq(dr.spec.get("subsets"))):
            return True
    return False


def check_destinations(mesh: Mesh) -> Iterator[Diagnostic]:
    """Route and mirror destinations: host, port and subset must exist (Istio's DestinationHost
    and DestinationRule analyzers)."""
    for vs in mesh.by_kind["VirtualService"]:
        export_to = _strs(vs.spec.get("exportTo"))
        for d in _destinations(vs):
            host = d.destination.get("host")
            if not isinstance(host, str) or not host:
                continue
            at = (*d.path, "host")
            entry = mesh.lookup(vs.namespace, export_to, host)
            if entry is None:
                yield _report(REFERENCED_RESOURCE_NOT_FOUND, vs, at, "mirror host" if d.mirror else "host",
                              _quote(host))
            else:
                port = _map(d.destination.get("port")).get("number")
                if port is None and len(entry.ports) > 1:
                    yield _report(DESTINATION_PORT_SELECTOR_REQUIRED, vs, at, _quote(host),
                                  _go_list(entry.ports))
                elif port is not None and port not in entry.ports:
                    yield _report(REFERENCED_RESOURCE_NOT_FOUND, vs, (*d.path, "port"), "host:port",
                                  _quote(f"{host}:{port}"))
            subset = d.destination.get("subset")
            if isinstance(subset, str) and subset and not _subset_defined(mesh, vs.namespace, host, subset):
                reftype = "mirror+subset in destinationrule" if d.mirror else "host+subset in destinationrule"
                yield _report(REFERENCED_RESOURCE_NOT_FOUND, vs, (*d.path, "subset"), reftype,
                              _quote(f"{host}+{subset}"))


def _gateway_key(namespace: str, name: str) -> tuple[str, str]:
    ns, _, short = name.rpartition("/")
    return ns or namespace, short


def _gateway_hosts(gateway: Resource, vs_namespace: str) -> list[str]:
    """The hosts a Gateway offers to VirtualServices in `vs_namespace` (`ns/host` filtered)."""
    out = []
    for server in map(_map, _seq(gateway.spec.get("servers"))):
        for host in _strs(server.get("hosts")):
            ns, _, name = host.rpartition("/")
            if not ns or ns == "*" or (ns == "." and gateway.namespace == vs_namespace) or ns == vs_namespace:
                out.append(name)
    return out


def check_gateways(mesh: Mesh) -> Iterator[Diagnostic]:
    """Gateways a VirtualService binds to must exist and offer its hosts (Istio's GatewayAnalyzer);
    a gateway named in a match must exist too, or the match never applies."""
    for vs in mesh.by_kind["VirtualService"]:
        hosts = _strs(vs.spec.get("hosts"))
        for i, name in enumerate(_seq(vs.spec.get("gateways"))):
            if not isinstance(name, str) or name == MESH_GATEWAY:
                continue
            gateway = mesh.gateways.get(_gateway_key(vs.namespace, name))
            at = ("spec", "gateways", i)
            if gateway is None:
                yield _report(REFERENCED_RESOURCE_NOT_FOUND, vs, at, "gateway", _quote(name))
            elif not any(host_matches(g, h) for g in _gateway_hosts(gateway, vs.namespace) for h in hosts):
                yield _report(HOST_NOT_IN_GATEWAY, vs, at, _go_list(hosts), f"{vs.namespace}/{vs.name}",
                              f"{gateway.namespace}/{gateway.name}")
        for section in ("http", "tls", "tcp"):
            for i, route in enumerate(_seq(vs.spec.get(section))):
                for j, match in enumerate(_seq(_map(route).get("match"))):
                    for k, name in enumerate(_seq(_map(match).get("gateways"))):
                        if (isinstance(name, str) and name != MESH_GATEWAY
                                and _gateway_key(vs.namespace, name) not in mesh.gateways):
                            at = ("spec", section, i, "match", j, "gateways", k)
                            yield _report(REFERENCED_RESOURCE_NOT_FOUND, vs, at, "gateway", _quote(name))


def check_mesh_gateway_hosts(mesh: Mesh) -> Iterator[Diagnostic]:
    """Two VirtualServices for one host on the mesh gateway: which applies is undefined."""
    groups: dict[tuple[str, str], dict[Key, Resource]] = defaultdict(dict)
    for vs in mesh.by_kind["VirtualService"]:
        gateways = _seq(vs.spec.get("gateways"))
        if gateways and MESH_GATEWAY not in gateways:
            continue
        for scope in _export_scopes(vs.namespace, _strs(vs.spec.get("exportTo"))):
            for host in _strs(vs.spec.get("hosts")):
                groups[scope, hostnames.fqdn(host, vs.namespace)][vs.key] = vs
    reported: set[Key] = set()
    for (scope, fqdn), members in sorted(groups.items()):
        conflicting = dict(members)
        if scope != "*":  # a namespace also sees what is exported everywhere
            for (other_scope, other), more in groups.items():
                if other_scope == "*" and host_matches(fqdn, other):
                    conflicting.update(more)
        if len(conflicting) < 2:
            continue
        names = ",".join(sorted(f"{k.namespace}/{k.name}" for k in conflicting))
        for key in sorted(conflicting):
            if key not in reported:
                reported.add(key)
                yield _report(CONFLICTING_MESH_GATEWAY_HOSTS, conflicting[key], (), names, fqdn)


# Match fields by how one condition implies another (anything else must be equal).
_STRING_MATCH_FIELDS = ("uri", "scheme", "method", "authority")
_STRING_MATCH_MAPS = ("headers", "queryParams")
_ANY_OF_FIELDS = ("gateways", "sniHosts", "destinationSubnets")
_NO_ROUTING_EFFECT = ("name", "statPrefix")


def _normalized(match: dict[str, Any]) -> dict[str, Any]:
    """A match without what does not affect routing; `uri: {prefix: /}` matches every path."""
    out = {k: v for k, v in match.items() if k not in _NO_ROUTING_EFFECT}
    if out.get("uri") == {"prefix": "/"}:
        del out["uri"]
    return out


def _string_covers(a: Any, b: Any) -> bool:
    """Every value StringMatch `b` accepts, `a` accepts too."""
    if a == b or (a == {} and isinstance(b, dict)):  # {}: present with any value
        return True
    prefix = _map(a).get("prefix")
    value = _map(b).get("exact", _map(b).get("prefix"))
    return isinstance(prefix, str) and isinstance(value, str) and value.startswith(prefix)


def covers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether (normalized) match `a` accepts every request match `b` accepts."""
    for field, want in a.items():
        have = b.get(field)
        if field in _STRING_MATCH_FIELDS:
            ok = _string_covers(want, have)
        elif field in _STRING_MATCH_MAPS:
            ok = all(_string_covers(v, _map(have).get(k)) for k, v in _map(want).items())
        elif field == "withoutHeaders":
            ok = all(_map(have).get(k) == v for k, v in _map(want).items())
        elif field in _ANY_OF_FIELDS:
            ok = bool(_seq(have)) and all(h in _seq(want) for h in _seq(have))
        elif field == "sourceLabels":
            ok = _selects(_labels(want), _labels(have))
        elif field == "ignoreUriCase":
            ok = True  # only widens `a`; the converse is checked below
        else:
            ok = want == have
        if not ok:
            return False
    return not (b.get("ignoreUriCase") is True and a.get("ignoreUriCase") is not True and "uri" in a)


def _rule_name(route: dict[str, Any], index: int) -> str:
    name = route.get("name")
    return _quote(name) if isinstance(name, str) and name else f"#{index}"


def _unreachable_rules(vs: Resource, section: str) -> Iterator[Diagnostic]:
    """Istio's analyzeUnreachable*Rules, with covering (not only identical) matches."""
    earlier: list[tuple[int, dict[str, Any]]] = []  # (rule index, normalized match)
    # Once a rule takes every request: why a later rule is unused, if it has matches / if not.
    catch_all: tuple[str, str] | None = None
    routes = [_map(route) for route in _seq(vs.spec.get(section))]
    for i, route in enumerate(routes):
        rule = _rule_name(route, i)
        raw = _seq(route.get("match"))
        matches = [(j, _normalized(m)) for j, m in enumerate(raw) if isinstance(m, dict)]
        if catch_all is not None:
            yield _report(UNREACHABLE_RULE, vs, ("spec", section, i), rule, catch_all[0 if matches else 1])
            continue
        if not matches:
            catch_all = ("route without matches defined before", "only the last rule can have no matches")
            continue
        used_before = 0
        for j, match in matches:
            prior = next((k for k, seen in earlier if covers(seen, match)), None)
            if prior is None:
                earlier.append((i, match))
                continue
            yield _report(INEFFECTIVE_MATCH, vs, ("spec", section, i, "match", j), rule,
                          _rule_name(raw[j], j), _rule_name(routes[prior], prior))
            if prior < i:
                used_before += 1
        if used_before == len(matches):
            yield _report(UNREACHABLE_RULE, vs, ("spec", section, i), rule, "all matches used by prior rules")
        if any(not match for _, match in matches):
            reason = f"catch-all match in rule {rule} defined before"
            catch_all = (reason, reason)


def check_unreachable_rules(mesh: Mesh) -> Iterator[Diagnostic]:
    """Rules after a catch-all, and matches an earlier match already takes, never see traffic."""
    for vs in mesh.by_kind["VirtualService"]:
        for section in ("http", "tcp", "tls"):
            yield from _unreachable_rules(vs, section)


# --- ServiceEntry, DestinationRule ----------------------------------------------------------------

def check_service_entry_addresses(mesh: Mesh) -> Iterator[Diagnostic]:
    """TCP has no Host header: without addresses the proxy cannot tell these hosts apart."""
    for se in mesh.by_kind["ServiceEntry"]:
        if se.spec.get("addresses") is not None:
            continue
        for i, port in enumerate(map(_map, _seq(se.spec.get("ports")))):
            protocol = port.get("protocol")
            if not protocol or (isinstance(protocol, str) and protocol.upper() == "TCP"):
                yield _report(ADDRESSES_REQUIRED, se, ("spec", "ports", i))


def check_destination_rules(mesh: Mesh) -> Iterator[Diagnostic]:
    """A DestinationRule's host must exist, and each subset must select some of its endpoints."""
    for dr in mesh.by_kind["DestinationRule"]:
        host = dr.spec.get("host")
        if not isinstance(host, str) or not host:
            continue
        entry = mesh.lookup(dr.namespace, _strs(dr.spec.get("exportTo")), host)
        if entry is None:
            if not (host.startswith("*") and any(host_matches(host, e.fqdn) for e in mesh.hosts.values())):
                yield _report(UNKNOWN_DESTINATION_RULE_HOST, dr, ("spec", "host"), host)
            continue
        backends = mesh.backends(entry)
        if backends is None or host.startswith("*"):
            continue
        for i, subset in enumerate(map(_map, _seq(dr.spec.get("subsets")))):
            wanted = {k: v for k, v in _labels(subset.get("labels")).items() if k not in TOPOLOGY_LABELS}
            if not any(_selects(wanted, labels) for labels in backends):
                yield _report(SUBSET_SELECTS_NO_PODS, dr, ("spec", "subsets", i), subset.get("name"))


# --- selectors: policies, gateways, sidecars ------------------------------------------------------

def check_policy_selectors(mesh: Mesh) -> Iterator[Diagnostic]:
    """A policy whose selector matches no workload protects nothing (Istio's AuthorizationPolicy
    analyzer, applied to the three security kinds)."""
    for policy in mesh.of_kind("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"):
        if policy.spec.get("targetRef") or policy.spec.get("targetRefs"):
            continue  # attached to a Service or Gateway, not selected workloads
        selector = _labels(_map(policy.spec.get("selector")).get("matchLabels"))
        if policy.namespace == ROOT_NAMESPACE:
            if selector and not mesh.selected(selector, None):
                yield _report(NO_MATCHING_WORKLOADS, policy, ("spec", "selector"), _selector_string(selector))
        elif not mesh.selected(selector, policy.namespace):
            yield _report(NO_MATCHING_WORKLOADS, policy, ("spec", "selector") if selector else (),
                          _selector_string(selector))


def _namespace_pattern_matches(pattern: str, namespace: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return namespace.endswith(pattern[1:])
    if pattern.endswith("*"):
        return namespace.startswith(pattern[:-1])
    return pattern.lower() == namespace.lower()


def check_policy_namespaces(mesh: Mesh) -> Iterator[Diagnostic]:
    """AuthorizationPolicy sources may name only namespaces that exist (as a Namespace or as
    the namespace of any resource analyzed)."""
    known = set(mesh.namespaces) | {r.namespace for r in mesh.resources if r.namespace}
    for policy in mesh.by_kind["AuthorizationPolicy"]:
        for i, rule in enumerate(_seq(policy.spec.get("rules"))):
            for j, frm in enumerate(_seq(_map(rule).get("from"))):
                source = _map(_map(frm).get("source"))
                for field in ("namespaces", "notNamespaces"):
                    for k, pattern in enumerate(_seq(source.get(field))):
                        if isinstance(pattern, str) and not any(_namespace_pattern_matches(pattern, ns)
                                                                for ns in known):
                            yield _report(REFERENCED_RESOURCE_NOT_FOUND, policy,
                                          ("spec", "rules", i, "from", j, "source", field, k), "namespace",
                                          _quote(pattern))


def check_gateway_selectors(mesh: Mesh) -> Iterator[Diagnostic]:
    """A Gateway configures the proxies its selector matches, in any namespace; none, no gateway."""
    for gateway in mesh.by_kind["Gateway"]:
        selector = _labels(gateway.spec.get("selector"))
        if not mesh.selected(selector, None):
            yield _report(REFERENCED_RESOURCE_NOT_FOUND, gateway, ("spec", "selector"), "selector",
                          _quote(_selector_string(selector)))


def _sidecar_selector(sidecar: Resource) -> dict[str, str]:
    return _labels(_map(sidecar.spec.get("workloadSelector")).get("labels"))


def _namespace_ambient(namespace: Resource | None) -> bool:
    labels = _labels(namespace.labels) if namespace else {}
    return (labels.get("istio.io/dataplane-mode") == "ambient" and labels.get("istio-injection") != "enabled"
            and not labels.get("istio.io/rev"))


def check_sidecar_selectors(mesh: Mesh) -> Iterator[Diagnostic]:
    """Each workload takes at most one Sidecar: by selector, else its namespace's only selectorless
    one (Istio's sidecar SelectorAnalyzer)."""
    by_workload: dict[tuple[str, str, str], tuple[Workload, list[Resource]]] = {}
    selectorless: dict[str, list[Resource]] = defaultdict(list)
    for sidecar in mesh.by_kind["Sidecar"]:
        selector = _sidecar_selector(sidecar)
        if not selector:
            selectorless[sidecar.namespace].append(sidecar)
            continue
        matched = mesh.selected(selector, sidecar.namespace)
        if not matched:
            yield _report(REFERENCED_RESOURCE_NOT_FOUND, sidecar, ("spec", "workloadSelector", "labels"),
                          "selector", _quote(_selector_string(selector)))
        for w in matched:
            by_workload.setdefault((w.kind, w.namespace, w.name), (w, []))[1].append(sidecar)
    ineffective: set[Key] = set()
    for workload, sidecars in by_workload.values():
        names = _go_list(sorted(s.name for s in sidecars))
        for sidecar in sidecars:
            if workload.ambient:
                if sidecar.key not in ineffective:
                    ineffective.add(sidecar.key)
                    yield _report(INEFFECTIVE_POLICY, sidecar, (),
                                  "selected workload is in ambient mode, the policy has no impact")
            elif len(sidecars) > 1:
                yield _report(CONFLICTING_SIDECAR_SELECTORS, sidecar, (), names, _quote(workload.namespace),
                              _quote(workload.name))
    for namespace, sidecars in selectorless.items():
        names = _go_list(sorted(s.name for s in sidecars))
        for sidecar in sidecars:
            if _namespace_ambient(mesh.namespaces.get(namespace)):
                yield _report(INEFFECTIVE_POLICY, sidecar, (),
                              "namespace is in ambient mode, the policy has no impact")
            elif len(sidecars) > 1:
                yield _report(MULTIPLE_SIDECARS_WITHOUT_SELECTORS, sidecar, (), names, _quote(namespace))


def _egress_host_exists(mesh: Mesh, namespace: str, dns: str) -> bool:
    """Whether a Service, ServiceEntry or VirtualService in `namespace` ("*": any) offers `dns`."""
    def in_scope(r: Resource) -> bool:
        return namespace == "*" or r.namespace == namespace

    fqdn = dns if namespace == "*" else hostnames.fqdn(dns, namespace)
    if any(in_scope(e.resource) and host_matches(e.fqdn, fqdn) for e in mesh.hosts.values()):
        return True
    return any(in_scope(vs) and host_matches(hostnames.fqdn(h, vs.namespace), fqdn)
               for vs in mesh.by_kind["VirtualService"] for h in _strs(vs.spec.get("hosts")))


def check_sidecar_egress(mesh: Mesh) -> Iterator[Diagnostic]:
    """A Sidecar's egress `namespace/host` that nothing offers imports nothing (a typo)."""
    for sidecar in mesh.by_kind["Sidecar"]:
        for i, egress in enumerate(_seq(sidecar.spec.get("egress"))):
            for j, host in enumerate(_seq(_map(egress).get("hosts"))):
                if not isinstance(host, str) or "/" not in host:
                    continue
                namespace, _, dns = host.partition("/")
                if namespace == "~" or dns.startswith("*"):
                    continue  # imports nothing, or a pattern rather than a reference
                namespace = sidecar.namespace if namespace == "." else namespace
                if not _egress_host_exists(mesh, namespace, dns):
                    yield _report(REFERENCED_RESOURCE_NOT_FOUND, sidecar, ("spec", "egress", i, "hosts", j),
                                  "egress host", _quote(host))


def _target_ports(services: list[Resource]) -> set[int] | None:
    """The workload ports these Services send to; None when a named targetPort hides one."""
    out: set[int] = set()
    for svc in services:
        for port in map(_map, _seq(svc.spec.get("ports"))):
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and target.isdigit():
                target = int(target)
            if not isinstance(target, int) or isinstance(target, bool):
                return None
            out.add(target)
    return out


def check_port_level_mtls(mesh: Mesh) -> Iterator[Diagnostic]:
    """portLevelMtls keys are workload (target) ports; zmesh builds inbound listeners only for the
    ports of the workload's Services, so a key none of them targets never applies."""
    for pa in mesh.by_kind["PeerAuthentication"]:
        selector = _labels(_map(pa.spec.get("selector")).get("matchLabels"))
        ports = _map(pa.spec.get("portLevelMtls"))
        if not selector or not ports:
            continue
        workloads = mesh.selected(selector, None if pa.namespace == ROOT_NAMESPACE else pa.namespace)
        services = list({s.key: s for w in workloads for s in mesh.services_of(w)}.values())
        targets = _target_ports(services) if services else None
        if targets is None:
            continue
        for key in ports:
            if str(key).isdigit() and int(key) not in targets:
                yield _report(INEFFECTIVE_POLICY, pa, ("spec", "portLevelMtls", str(key)),
                              f"portLevelMtls port {key} is not a target port of any Service of the "
                              f"selected workloads {_go_list(sorted(targets))}")


ANALYZERS: tuple[Callable[[Mesh], Iterable[Diagnostic]], ...] = (
    check_destinations, check_gateways, check_mesh_gateway_hosts, check_unreachable_rules,
    check_service_entry_addresses, check_destination_rules, check_policy_selectors, check_policy_namespaces,
    check_gateway_selectors, check_sidecar_selectors, check_sidecar_egress, check_port_level_mtls,
)


def first_definitions(resources: Iterable[Resource], defined: Mapping[Key, Resource] | None = None,
                      consequence: str = ANALYZED_FIRST) -> tuple[list[Resource], list[Diagnostic]]:
    """One resource per key, as the mesh would hold it; a later definition, or one of a key
    already `defined` elsewhere, is reported (ZM0002) with `consequence`."""
    first: dict[Key, Resource] = dict(defined or {})
    unique, duplicates = [], []
    for r in resources:
        earlier = first.get(r.key)
        if earlier is not None:
            where = f"{earlier.file}:{earlier.line_of(('metadata', 'name'))}"
            duplicates.append(_report(DUPLICATE_RESOURCE, r, (), r.key, where, consequence))
        else:
            first[r.key] = r
            unique.append(r)
    return unique, duplicates


def _sort_key(d: Diagnostic) -> tuple[str, int, str, str, str, str, str, str]:
    return d.file, d.line, d.code, d.kind, d.namespace, d.resource, d.path, d.message


def analyze(resources: Iterable[Resource], diagnostics: Iterable[Diagnostic] = ()) -> list[Diagnostic]:
    """Every analyzer's messages over `resources`, plus `diagnostics` (those from loading them),
    in a stable order: by file, line and code."""
    unique, out = first_definitions(resources)
    out += diagnostics
    mesh = Mesh(unique)
    for analyzer in ANALYZERS:
        out += analyzer(mesh)
    return sorted(set(out), key=_sort_key)
