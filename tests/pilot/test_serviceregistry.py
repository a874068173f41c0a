"""The service registry: Kubernetes Services, ServiceEntries, WorkloadEntries and live registrations."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from controlplane.config.model import Resource
from controlplane.config.validate import load_paths, load_text
from controlplane.pilot.model import Protocol
from controlplane.pilot.serviceregistry.aggregate import ServiceRegistry, services_from_config
from controlplane.pilot.serviceregistry.leases import Registrations

BOOKINFO_HOSTS = [f"{n}.default.svc.cluster.local" for n in ("details", "productpage", "ratings", "reviews")]


def load(text: str) -> list[Resource]:
    result = load_text(text)
    assert not result.errors, result.errors
    return result.resources


def registry(text: str = "") -> ServiceRegistry:
    reg = ServiceRegistry()
    reg.update_config(load(text) if text else [])
    return reg


def workload(wid: str = "reviews-v1-abc", ip: str = "10.0.0.1", **extra: object) -> dict[str, object]:
    return {"id": wid, "namespace": "default", "ip": ip,
            "labels": {"app": "reviews", "version": "v1"}, "service_account": "bookinfo-reviews", **extra}


REVIEWS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
"""


# ---- Kubernetes


def test_bookinfo_services(istio_testdata: Path) -> None:
    resources = load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml"]).resources
    services, endpoints = services_from_config(resources)
    assert [s.hostname for s in services] == BOOKINFO_HOSTS
    for s in services:
        assert [(p.name, p.number, p.protocol) for p in s.ports] == [("http", 9080, Protocol.HTTP)]
        assert s.source == "kubernetes" and s.namespace == "default" and not s.mesh_external
        assert s.selector == {"app": s.name}
    assert endpoints == []  # Deployments in a manifest have no pod IPs


def test_bookinfo_deployment_labels(istio_testdata: Path) -> None:
    reg = ServiceRegistry()
    reg.update_config(load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml"]).resources)
    reviews = [d for d in reg.workload_labels("default") if d.get("app") == "reviews"]
    assert reviews == [{"app": "reviews", "version": v} for v in ("v1", "v2", "v3")]
    assert reg.workload_labels("elsewhere") == []
    assert reg.service("reviews.default.svc.cluster.local").name == "reviews"
    assert reg.endpoints("reviews.default.svc.cluster.local") == []


def test_deployment_scaled_to_zero_has_no_workloads() -> None:
    reg = registry("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: idle}
spec:
  replicas: 0
  selector: {matchLabels: {app: idle}}
  template: {metadata: {labels: {app: idle}}, spec: {containers: []}}
""")
    assert reg.workload_labels("default") == []


def test_protocol_selection() -> None:
    reg = registry("""
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  selector: {app: mixed}
  ports:
  - {name: http-web, port: 80, appProtocol: https}
  - {name: http2-x, port: 81}
  - {name: grpc, port: 82}
  - {name: tcp-db, port: 83}
  - {port: 84}
  - {name: foo, port: 85}
  - {name: dns, port: 53, protocol: UDP}
""")
    ports = reg.service("mixed.default.svc.cluster.local").ports
    assert [(p.number, p.protocol) for p in ports] == [
        (80, Protocol.HTTPS), (81, Protocol.HTTP2), (82, Protocol.GRPC), (83, Protocol.TCP),
        (84, Protocol.UNKNOWN), (85, Protocol.UNKNOWN)]  # UDP is not carried by the proxy


def test_pods_with_ips_are_endpoints_and_named_target_ports_resolve() -> None:
    named = REVIEWS.replace("port: 9080}", "port: 9080, targetPort: web}")
    reg = registry(named + """
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, labels: {app: reviews, version: v1}}
spec:
  serviceAccountName: bookinfo-reviews
  containers: [{name: app, ports: [{name: web, containerPort: 8080}]}]
status: {podIP: 10.1.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-pending, labels: {app: reviews, version: v2}}
spec: {containers: [{name: app, ports: [{name: web, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-no-port, labels: {app: reviews, version: v3}}
spec: {containers: [{name: app}]}
status: {podIP: 10.1.0.9}
""")
    [ep] = reg.endpoints("reviews.default.svc.cluster.local")
    assert (ep.address, ep.port, ep.service_port) == ("10.1.0.7", 8080, 9080)
    assert ep.labels == {"app": "reviews", "version": "v1"}
    assert ep.service_account == "bookinfo-reviews" and ep.source == "kubernetes"
    assert reg.service("reviews.default.svc.cluster.local").ports[0].target_port is None
    assert len(reg.workload_labels("default")) == 3  # the pending pod still carries labels


def test_headless_and_external_name_services() -> None:
    reg = registry("""
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, annotations: {networking.istio.io/exportTo: "."}}
spec: {type: ExternalName, externalName: legacy.example.com, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}]}
""")
    db = reg.service("db.default.svc.cluster.local")
    assert (db.resolution, db.addresses) == ("NONE", [])
    legacy = reg.service("legacy.default.svc.cluster.local")
    assert (legacy.resolution, legacy.mesh_external, legacy.export_to) == ("DNS", True, ["default"])
    assert [(e.address, e.port) for e in reg.endpoints(legacy.hostname)] == [("legacy.example.com", 80)]
    assert reg.service("web.default.svc.cluster.local").addresses == ["10.96.0.10"]


# ---- ServiceEntry


def test_google_apis_service_entry(istio_testdata: Path) -> None:
    resources = load_paths([istio_testdata / "bookinfo" / "egress-rule-google-apis.yaml"]).resources
    services, endpoints = services_from_config(resources)
    [se] = services
    assert se.hostname == "www.googleapis.com" and se.source == "serviceentry"
    assert [(p.number, p.protocol) for p in se.ports] == [(80, Protocol.HTTP), (443, Protocol.HTTPS)]
    assert (se.resolution, se.mesh_external, se.export_to) == ("DNS", True, ["*"])
    # DNS without endpoints: Istio resolves the host itself
    assert [(e.address, e.port, e.service_port) for e in endpoints] == [
        ("www.googleapis.com", 80, 80), ("www.googleapis.com", 443, 443)]


@pytest.mark.parametrize("version", ["v1", "v1alpha3", "v1beta1"])
def test_validation_service_entries(istio_testdata: Path, version: str) -> None:
    path = istio_testdata / "validation" / f"networking-{version}-ServiceEntry.yaml"
    resources = load_paths([path]).resources
    services, endpoints = services_from_config(resources)
    [se] = services
    assert (se.hostname, se.resolution, se.mesh_external) == ("eu.bookinfo.com", "DNS", True)
    assert [(p.name, p.number, p.protocol) for p in se.ports] == [("http", 80, Protocol.HTTP)]
    [ep] = endpoints
    assert (ep.hostname, ep.address, ep.port, ep.service_port) == (
        "eu.bookinfo.com", "t.istio-system.svc.cluster.local", 8080, 80)


def test_service_entry_fields() -> None:
    reg = registry("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: apps}
spec:
  hosts: [db]
  addresses: [10.9.0.0/24]
  location: MESH_INTERNAL
  resolution: STATIC
  exportTo: ["."]
  ports:
  - {number: 5432, name: tcp-pg, protocol: TCP, targetPort: 15432}
  - {number: 8080, name: web, protocol: HTTP}
  endpoints:
  - {address: 10.9.0.1, labels: {zone: a}, locality: r1/z1, weight: 3, network: n1, serviceAccount: db,
     ports: {web: 18080}}
""")
    short = reg.service("db.apps.svc.cluster.local")  # short hosts resolve in the entry's namespace
    assert short is not None
    assert (short.addresses, short.resolution, short.mesh_external, short.export_to) == (
        ["10.9.0.0/24"], "STATIC", False, ["apps"])
    eps = reg.endpoints("db.apps.svc.cluster.local")
    assert [(e.address, e.port, e.service_port) for e in eps] == [("10.9.0.1", 15432, 5432),
                                                                 ("10.9.0.1", 18080, 8080)]
    e = eps[0]
    assert (e.labels, e.locality, e.weight, e.network, e.service_account) == (
        {"zone": "a"}, "r1/z1", 3, "n1", "db")


def test_declared_protocol_outranks_the_port_name_in_service_entries() -> None:
    reg = registry("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [ext.example.com]
  resolution: DNS
  ports: [{number: 80, name: tcp-web, protocol: HTTP}, {number: 81, name: grpc-x}]
""")
    assert [p.protocol for p in reg.service("ext.example.com").ports] == [Protocol.HTTP, Protocol.GRPC]


# ---- WorkloadEntry

WORKLOAD_ENTRIES = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: default}
spec:
  address: 192.168.1.10
  labels: {app: reviews, version: vm}
  ports: {http: 19080}
  serviceAccount: reviews-vm
  locality: us-east/a
  network: vpc
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: other}
spec: {address: 192.168.1.11, labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: default}
spec:
  hosts: [reviews.vm.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9080}, {number: 90, name: admin}]
  workloadSelector: {labels: {version: vm}}
"""


def test_workload_entry_backs_selecting_service_and_service_entry() -> None:
    reg = registry(REVIEWS + "---" + WORKLOAD_ENTRIES)
    [kube] = reg.endpoints("reviews.default.svc.cluster.local")  # not vm-2: another namespace
    assert (kube.address, kube.port, kube.service_port) == ("192.168.1.10", 19080, 9080)  # port map by name
    assert (kube.service_account, kube.locality, kube.network, kube.source) == (
        "reviews-vm", "us-east/a", "vpc", "workloadentry")
    se = reg.endpoints("reviews.vm.internal")
    # port map by name, else targetPort, else the port
    assert [(e.address, e.port, e.service_port) for e in se] == [("192.168.1.10", 19080, 80),
                                                                 ("192.168.1.10", 90, 90)]
    assert {"app": "reviews", "version": "vm"} in reg.workload_labels("default")


def test_named_target_port_missing_from_workload_entry_gives_no_endpoint() -> None:
    reg = registry(REVIEWS.replace("port: 9080}", "port: 9080, targetPort: web}") + "---" + WORKLOAD_ENTRIES)
    assert reg.endpoints("reviews.default.svc.cluster.local") == []


def test_service_entry_host_already_a_kubernetes_service() -> None:
    reg = registry(REVIEWS + """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: elsewhere}
spec:
  hosts: [reviews.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 1234, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.0.99}]
""")
    svc = reg.service("reviews.default.svc.cluster.local")
    assert svc.source == "kubernetes" and [p.number for p in svc.ports] == [9080]
    assert reg.endpoints(svc.hostname) == []  # the entry lives in another namespace: not merged


# ---- Registrations


def test_registration_backs_matching_service_and_is_a_proxy() -> None:
    reg = registry(REVIEWS)
    reg.registrations.register(workload(ports={"http": 9081}), "node-a", now=0.0, lease=10.0)
    [ep] = reg.endpoints("reviews.default.svc.cluster.local")
    assert (ep.address, ep.port, ep.service_port, ep.source) == ("10.0.0.1", 9081, 9080, "registration")
    assert ep.service_account == "bookinfo-reviews"
    [proxy] = reg.registrations.proxies()
    assert (proxy.id, proxy.namespace, proxy.ip, proxy.node) == (
        "reviews-v1-abc", "default", "10.0.0.1", "node-a")
    assert proxy.service_account == "bookinfo-reviews"
    assert {"app": "reviews", "version": "v1"} in reg.workload_labels("default")


def test_registration_backs_service_entry_with_workload_selector() -> None:
    reg = registry(WORKLOAD_ENTRIES)
    reg.registrations.register(workload("vm-3", "10.0.0.3", labels={"version": "vm"}), "node-a", 0.0, 10.0)
    reg.registrations.register(workload("other", "10.0.0.4", labels={"version": "v1"}), "node-a", 0.0, 10.0)
    assert {e.address for e in reg.endpoints("reviews.vm.internal")} == {"192.168.1.10", "10.0.0.3"}


def test_heartbeats_keep_registrations_and_silence_expires_them() -> None:
    reg = registry(REVIEWS)
    regs = reg.registrations
    regs.register(workload("a", "10.0.0.1"), "node-a", now=0.0, lease=10.0)
    regs.register(workload("b", "10.0.0.2"), "node-a", now=0.0, lease=10.0)
    regs.register(workload("c", "10.0.0.3"), "node-b", now=0.0, lease=10.0)
    for now in (8.0, 16.0, 24.0):
        assert regs.heartbeat("node-a", now) == 2
        assert regs.expire(now) == (["c"] if now == 16.0 else [])  # node-b went silent
    assert [e.address for e in reg.endpoints("reviews.default.svc.cluster.local")] == ["10.0.0.1", "10.0.0.2"]
    assert regs.expire(33.9) == []
    assert regs.expire(34.0) == ["a", "b"]  # node-a died after its last heartbeat at 24
    assert reg.endpoints("reviews.default.svc.cluster.local") == []
    assert regs.proxies() == [] and regs.heartbeat("node-a", 35.0) == 0


def test_deregister() -> None:
    reg = registry(REVIEWS)
    reg.registrations.register(workload(), "node-a", 0.0, 10.0)
    assert reg.registrations.deregister("reviews-v1-abc") is True
    assert reg.registrations.deregister("reviews-v1-abc") is False
    assert reg.endpoints("reviews.default.svc.cluster.local") == []
    assert reg.registrations.heartbeat("node-a", 1.0) == 0


def test_reregister_with_new_ip_replaces_the_endpoint() -> None:
    reg = registry(REVIEWS)
    reg.registrations.register(workload(ip="10.0.0.1"), "node-a", 0.0, 10.0)
    reg.registrations.register(workload(ip="10.0.0.9"), "node-b", 1.0, 10.0)  # moved to another node
    assert [e.address for e in reg.endpoints("reviews.default.svc.cluster.local")] == ["10.0.0.9"]
    assert reg.registrations.heartbeat("node-a", 2.0) == 0
    assert reg.registrations.expire(10.5) == []  # the lease restarted at 1.0


def test_only_a_registrations_owners_may_change_it() -> None:
    """Owners: who filed it, and the node agent a self-registering proxy names."""
    regs = Registrations()
    regs.register(workload("a-1"), "proxy-a", 0.0, 10.0, agent="node-1")
    regs.register(workload("n-1", "10.0.0.9"), "node-1", 0.0, 10.0)
    assert regs.may_change("a-1", "proxy-a") and regs.may_change("a-1", "node-1")
    assert not regs.may_change("a-1", "proxy-b") and not regs.may_change("n-1", "proxy-a")
    assert regs.may_change("free", "proxy-b")  # nobody holds it
    # a heartbeat renews what the caller filed, and the listed ids it owns, nothing else
    assert regs.heartbeat("proxy-b", 5.0, ["a-1", "n-1"]) == 0
    assert regs.heartbeat("node-1", 5.0, ["a-1"]) == 2
    assert regs.expire(12.0) == []
    assert regs.heartbeat("proxy-a", 12.0) == 1
    assert regs.expire(15.5) == ["n-1"]


@pytest.mark.parametrize("bad", [
    {"id": ""}, {"namespace": ""}, {"ip": "not-an-ip"}, {"ip": 167772161}, {"labels": {"a": 1}},
    {"ports": {"http": 0}}, {"ports": {"http": "80"}}, {"service_account": 7},
])
def test_register_rejects_malformed_workloads(bad: dict[str, object]) -> None:
    regs = Registrations()
    with pytest.raises(ValueError):
        regs.register({**workload(), **bad}, "node-a", 0.0, 10.0)
    with pytest.raises(ValueError):
        regs.register(workload(), "node-a", 0.0, 0.0)
    assert regs.workloads() == []


# ---- versions and determinism


def test_version_changes_iff_content_changes(istio_testdata: Path) -> None:
    resources = load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml"]).resources
    reg = ServiceRegistry()
    empty = reg.version()
    reg.update_config(resources)
    base = reg.version()
    assert base != empty
    reg.update_config(list(reversed(resources)))
    assert reg.version() == base  # same content, any order
    reg.registrations.register(workload(), "node-a", 0.0, 10.0)
    registered = reg.version()
    assert registered != base
    reg.registrations.heartbeat("node-a", 5.0)
    assert reg.version() == registered  # a heartbeat changes nothing pilot serves
    reg.registrations.register(workload(ip="10.0.0.2"), "node-a", 6.0, 10.0)
    assert reg.version() not in (base, registered)
    reg.registrations.register(workload(), "node-a", 7.0, 10.0)
    assert reg.version() == registered  # back to the same content
    reg.registrations.deregister("reviews-v1-abc")
    assert reg.version() == base
    reg.update_config([r for r in resources if r.name != "reviews-v3"])
    assert reg.version() != base
    reg.update_config([])
    assert reg.version() == empty


def test_equal_inputs_give_equal_outputs(istio_testdata: Path) -> None:
    resources = load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml",
                            istio_testdata / "bookinfo" / "egress-rule-google-apis.yaml"]).resources
    resources += load(REVIEWS.replace("reviews", "web") + "---" + WORKLOAD_ENTRIES)
    shuffled = list(resources)
    random.Random(7).shuffle(shuffled)
    assert services_from_config(resources) == services_from_config(shuffled)
    a, b = ServiceRegistry(), ServiceRegistry()
    a.update_config(resources)
    b.update_config(shuffled)
    for wid, ip in (("x", "10.0.0.5"), ("y", "10.0.0.4")):
        a.registrations.register(workload(wid, ip), "n", 0.0, 10.0)
    for wid, ip in (("y", "10.0.0.4"), ("x", "10.0.0.5")):
        b.registrations.register(workload(wid, ip), "n", 0.0, 10.0)
    assert a.version() == b.version()
    assert a.all_endpoints() == b.all_endpoints()
    assert a.workload_labels("default") == b.workload_labels("default")
    assert [e.address for e in a.endpoints("reviews.default.svc.cluster.local")] == [
        "10.0.0.4", "10.0.0.5", "192.168.1.10"]
