"""Pilot end to end on real sockets: galley keys in, simulated proxies ACKing and NACKing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from bus.keys import Keyring
from bus.loop import Loop
from bus.rpc import RpcClient
from bus.signing import Verifier
from controlplane.config.validate import load_paths, load_text
from controlplane.debounce import Debouncer
from controlplane.pilot.xds.server import Pilot, serve_rpc, subscribe_galley
from controlplane.pilot.xds.status import NACKED, NOT_SENT, SYNCED
from tests.bus.helpers import fixed_endpoints, publisher
from tests.conftest import free_port, metric, wait_for, wait_released
from tests.pilot.simproxy import SimProxy

REVIEWS_80_20 = "virtual-service-reviews-80-20.yaml"


class Mesh:
    """A fake galley (a real publisher of galley/ keys), a pilot, and helpers to add proxies."""

    def __init__(self, keydir: Path, loops, debounce: float = 0.02, lease: float = 15.0,
                 endpoints: dict | None = None, rpc_endpoint: str = "tcp://127.0.0.1:*") -> None:
        self.keydir = keydir
        self.galley = publisher(loops("galley"), keydir, name="galley")
        self.loop: Loop = loops("pilot")
        ring = Keyring(keydir, "pilot")
        endpoints = endpoints or {"pub_endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"}
        self.pub = publisher(self.loop, keydir, name="pilot", **endpoints)
        self.pilot: Pilot = self.loop.call_sync(lambda: Pilot(self.loop, self.pub, Debouncer(debounce, 1.0),
                                                             lease=lease))
        self.loop.call_sync(lambda: subscribe_galley(
            self.loop, self.pilot, pub_endpoint=self.galley.pub_endpoint,
            snapshot_endpoint=self.galley.snapshot_endpoint, keyring=ring, server="galley",
            verifier=Verifier(ring.trusted_signers), silence_timeout=2.0))
        self.rpc = self.loop.call_sync(lambda: serve_rpc(self.loop, self.pilot, rpc_endpoint, ring))
        self.proxies: list[SimProxy] = []
        self.proxy_loop = loops("proxies")

    def apply(self, resources) -> None:
        for r in resources:
            self.galley.set(f"galley/{r.kind}/{r.namespace}/{r.name}", r.normalized())

    def proxy(self, proxy_id: str, labels: dict, ip: str, **kw) -> SimProxy:
        p = SimProxy(self.proxy_loop, Keyring(self.keydir, "proxy-a"), proxy_id=proxy_id, namespace="default",
                     ip=ip, labels=labels, pilot_rpc=self.rpc.endpoint, pilot_pub=self.pub.pub_endpoint,
                     pilot_snapshot=self.pub.snapshot_endpoint, **kw)
        self.proxies.append(p)
        return p

    def status(self) -> dict[str, dict]:
        client = RpcClient(self.rpc.endpoint, Keyring(self.keydir, "nodeagent"), "pilot")
        try:
            return {r["proxy"]: r for r in client.call("status")}
        finally:
            client.close()

    def close(self) -> None:
        for p in self.proxies:
            p.close()


@pytest.fixture
def mesh(keydir, loops, istio_testdata):
    m = Mesh(keydir, loops)
    m.apply(load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml",
                        istio_testdata / "bookinfo" / "destination-rule-all.yaml"]).resources)
    yield m
    m.close()


def routes_to(config: dict, fragment: str) -> bool:
    return fragment in str(config.get("routes"))


def test_identical_proxies_share_a_group_and_ack(mesh, istio_testdata) -> None:
    a = mesh.proxy("productpage-1", {"app": "productpage", "version": "v1"}, "10.0.0.1")
    b = mesh.proxy("productpage-2", {"app": "productpage", "version": "v1"}, "10.0.0.2")
    c = mesh.proxy("reviews-1", {"app": "reviews", "version": "v1"}, "10.0.0.3")
    assert a.group == b.group != c.group
    assert wait_for(lambda: a.applied and b.applied and c.applied, timeout=10)
    assert a.applied == b.applied
    assert wait_for(lambda: all(r["state"] == SYNCED for r in mesh.status().values()), timeout=5)

    # a VirtualService edit reaches every affected proxy, and each ACKs the new version
    before = a.applied
    mesh.apply(load_paths([istio_testdata / "bookinfo" / REVIEWS_80_20]).resources)
    assert wait_for(lambda: a.applied != before and routes_to(a.applied_config, "|v2|reviews"), timeout=10)
    assert wait_for(lambda: mesh.status()["productpage-1"]["acked"] == a.applied, timeout=5)


def test_a_nack_is_reported_with_the_error_and_the_version_in_force(mesh) -> None:
    p = mesh.proxy("reviews-1", {"app": "reviews", "version": "v1"}, "10.0.0.3",
                   reject=lambda cfg: "unsupported fault" if "'fault':" in str(cfg.get("routes")) else None)
    assert wait_for(lambda: p.applied, timeout=10)
    good = p.applied
    [fault] = load_text("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: ratings, subset: v1}}]
""", "f.yaml").resources
    mesh.apply([fault])
    assert wait_for(lambda: p.rejected, timeout=10)
    assert wait_for(lambda: mesh.status()["reviews-1"]["state"] == NACKED, timeout=5)
    row = mesh.status()["reviews-1"]
    assert row["error"] == "unsupported fault" and row["in_force"] == good and row["sent"] == p.rejected[-1]


def test_debounce_folds_a_burst_into_one_push(mesh) -> None:
    p = mesh.proxy("reviews-1", {"app": "reviews", "version": "v1"}, "10.0.0.3")
    assert wait_for(lambda: p.applied, timeout=10)
    pushes = mesh.pilot.pushes
    mesh.pilot.debounce.quiet = 0.2
    for _ in range(100):  # 100 changes in well under 50 ms
        mesh.loop.call_soon_threadsafe(lambda: mesh.pilot.on_galley("galley/x/default/y", None))
    assert wait_for(lambda: mesh.pilot.pushes > pushes, timeout=5)
    time.sleep(0.5)
    assert mesh.pilot.pushes == pushes + 1


def test_not_sent_until_the_first_push_and_lease_expiry_removes_workloads(keydir, loops) -> None:
    m = Mesh(keydir, loops, debounce=1.0, lease=1.5)
    try:
        p = m.proxy("orphan-1", {"app": "orphan"}, "10.0.0.9")
        assert m.status()["orphan-1"]["state"] == NOT_SENT  # the push is still being debounced
        assert wait_for(lambda: p.applied, timeout=10)
        assert wait_for(lambda: m.status()["orphan-1"]["state"] == SYNCED, timeout=5)
        # no heartbeats: the lease runs out and the workload is gone
        assert wait_for(lambda: "orphan-1" not in m.status(), timeout=5)
        assert m.loop.call_sync(lambda: m.pilot.registry.registrations.proxies()) == []
    finally:
        m.close()


def test_a_pilot_restart_gives_reconnecting_proxies_the_same_version_without_a_storm(
        keydir, loops, istio_testdata) -> None:
    ports = fixed_endpoints()
    rpc_endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = Mesh(keydir, loops, endpoints=ports, rpc_endpoint=rpc_endpoint)
    config = load_paths([istio_testdata / "bookinfo" / "bookinfo.yaml",
                         istio_testdata / "bookinfo" / "destination-rule-all.yaml"]).resources
    first.apply(config)
    proxies = [first.proxy(f"reviews-{i}", {"app": "reviews", "version": "v1"}, f"10.0.1.{i + 1}")
               for i in range(5)]
    assert wait_for(lambda: all(p.applied for p in proxies), timeout=10)
    version = proxies[0].applied
    applies = [p.applies for p in proxies]
    first.loop.stop()  # pilot dies with everything it knew
    wait_released(*ports.values(), rpc_endpoint)

    # a new pilot on the same ports, reading the same galley
    loop = loops("pilot2")
    ring = Keyring(keydir, "pilot")
    pub = publisher(loop, keydir, name="pilot", **ports)
    # the debounce is the storm protection: re-registrations within its quiet time fold into one
    # push. The five arrive within one heartbeat (0.2 s) plus a round trip; a quiet time of 1 s
    # keeps that true on a loaded machine, where 0.3 s split the burst into several pushes.
    pilot = loop.call_sync(lambda: Pilot(loop, pub, Debouncer(1.0, 5.0)))
    loop.call_sync(lambda: subscribe_galley(
        loop, pilot, pub_endpoint=first.galley.pub_endpoint, snapshot_endpoint=first.galley.snapshot_endpoint,
        keyring=ring, server="galley", verifier=Verifier(ring.trusted_signers)))
    loop.call_sync(lambda: serve_rpc(loop, pilot, rpc_endpoint, ring))
    for p in proxies:
        p.heartbeat_every(0.2)  # the new pilot reports them missing, so each registers again
    # they said which version they run, pilot computes the same one: SYNCED with no re-apply
    assert wait_for(lambda: all(pilot.status.state(p.id, time.monotonic()) == SYNCED for p in proxies),
                    timeout=10)
    assert wait_for(lambda: loop.call_sync(lambda: not pilot.debounce.pending), timeout=10)
    assert pilot.group_versions and set(pilot.group_versions.values()) == {version}
    assert [p.applies for p in proxies] == applies  # same version: nothing re-applied
    assert pilot.pushes <= 3  # one debounced push for the burst of re-registrations, not one each
    first.close()


def test_proxy_config_shows_what_the_proxy_applied(mesh) -> None:
    from click.testing import CliRunner

    from meshctl.cli import cli

    p = mesh.proxy("reviews-1", {"app": "reviews", "version": "v1"}, "10.0.0.3")
    assert wait_for(lambda: p.applied, timeout=10)
    assert wait_for(lambda: mesh.status()["reviews-1"]["acked"] == p.applied, timeout=5)
    args = ["--keys", str(mesh.keydir), "--as", "nodeagent", "--pilot", mesh.rpc.endpoint]
    result = CliRunner().invoke(cli, ["proxy-config", *args, "reviews-1", "clusters"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["version"] == p.applied
    assert "outbound|9080|v2|reviews.default.svc.cluster.local" in out["clusters"]
    result = CliRunner().invoke(cli, ["proxy-status", *args])
    assert result.exit_code == 0 and "reviews-1" in result.output and SYNCED in result.output
    result = CliRunner().invoke(cli, ["proxy-config", *args, "nobody"])
    assert result.exit_code == 1 and "unknown proxy" in result.output


def test_workloads_tells_citadel_what_runs_on_a_node_and_nobody_else(mesh) -> None:
    """Registrations are filed under the caller's CURVE identity (it cannot claim another node);
    citadel's node authorization reads them back, and only citadel may."""
    from bus.rpc import RpcError

    p = mesh.proxy("reviews-1", {"app": "reviews", "version": "v1"}, "10.0.0.3", service_account="reviews")
    assert wait_for(lambda: p.applied, timeout=10)
    asker = RpcClient(mesh.rpc.endpoint, Keyring(mesh.keydir, "citadel"), "pilot")
    other = RpcClient(mesh.rpc.endpoint, Keyring(mesh.keydir, "proxy-b"), "pilot", retries=0)
    try:
        # the SimProxy said node=reviews-1 in its body; its key is proxy-a, and that is what counts
        assert asker.call("workloads", {"node": "proxy-a"}) == [{"namespace": "default",
                                                                 "service_account": "reviews"}]
        assert asker.call("workloads", {"node": "reviews-1"}) == []
        with pytest.raises(RpcError, match="answered to citadel only"):
            other.call("workloads", {"node": "proxy-a"})
    finally:
        asker.close()
        other.close()


def test_only_the_owner_may_deregister_renew_or_replace_a_registration(mesh, caplog) -> None:
    """Proxy A registers itself (key proxy-a) naming its node agent; key B can neither remove,
    renew nor replace A's registration; A and A's node agent can."""
    from bus.rpc import RpcError

    def endpoints() -> list[str]:
        """The addresses pilot's registry holds for reviews-1 (what reviews' endpoints are built from)."""
        regs = mesh.pilot.registry.registrations
        return mesh.loop.call_sync(lambda: [w.address for w in regs.workloads() if w.name == "reviews-1"])

    def refused() -> float:
        return sum(metric("zmesh_bus_rpc_refused_total", method=m, reason="not_owner")
                   for m in ("register", "heartbeat", "deregister"))

    clients = {name: RpcClient(mesh.rpc.endpoint, Keyring(mesh.keydir, name), "pilot", retries=0)
               for name in ("proxy-a", "proxy-b", "nodeagent")}
    a, b, agent = clients["proxy-a"], clients["proxy-b"], clients["nodeagent"]
    workload = {"id": "reviews-1", "namespace": "default", "ip": "10.0.0.3", "node": "nodeagent",
                "labels": {"app": "reviews", "version": "v1"}, "service_account": "reviews"}
    try:
        a.call("register", workload)
        assert endpoints() == ["10.0.0.3"]
        before = refused()
        attempts = [("deregister", {"id": "reviews-1"}),
                    ("heartbeat", {"node": "proxy-a", "ids": ["reviews-1"]}),
                    ("register", {**workload, "ip": "10.6.6.6"})]
        with caplog.at_level(logging.WARNING, logger="zmesh.bus.rpc-server"):
            for method, body in attempts:
                with pytest.raises(RpcError, match="proxy-b does not own the registration of reviews-1") \
                        as exc:
                    b.call(method, body)
                assert exc.value.code == "not_owner"
        assert refused() == before + len(attempts)
        assert any(r.getMessage() == "request refused" and r.fields["peer"] == "proxy-b"
                   and r.fields["reason"] == "not_owner" for r in caplog.records)
        assert endpoints() == ["10.0.0.3"]  # the registration stays, as A made it
        assert b.call("heartbeat", {"node": "proxy-b"})["renewed"] == 0  # B renews only its own

        assert a.call("heartbeat", {"node": "nodeagent", "ids": ["reviews-1"]}) == {
            "lease": mesh.pilot.lease, "renewed": 1, "missing": []}
        assert agent.call("heartbeat", {"node": "nodeagent", "ids": ["reviews-1"]})["renewed"] == 1
        assert agent.call("deregister", {"id": "reviews-1"}) == {}
        assert endpoints() == []
        # a free id is anyone's to take; the node agent's own registrations are its alone
        b.call("register", {**workload, "ip": "10.0.0.4"})
        assert b.call("deregister", {"id": "reviews-1"}) == {}
        agent.call("register", {**workload, "node": ""})
        with pytest.raises(RpcError, match="not_owner"):
            a.call("deregister", {"id": "reviews-1"})
        assert agent.call("heartbeat", {"node": "nodeagent"})["renewed"] == 1
        assert endpoints() == ["10.0.0.3"]
        assert refused() == before + len(attempts) + 1
    finally:
        for client in clients.values():
            client.close()
