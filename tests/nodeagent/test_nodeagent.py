"""The node agent end to end on real sockets, with a real pilot and a real citadel in-process.

Certificates live 4 s (the agent asks citadel for ttl_s=4), so rotations, outages and
recoveries all happen within a few seconds.
"""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bus import keys
from bus.keys import Keyring
from bus.rpc import RpcClient, RpcError
from nodeagent.certs import CertDir, CertSet, new_key_and_csr, split_pem
from tests.bus.helpers import subscriber
from tests.conftest import metric, wait_for
from tests.nodeagent.helpers import TTL, ControlPlane, Node, Records, node_agent_logs

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.fixture
def mesh_keys(keydir: Path) -> Path:
    """The session key directory plus citadel, its admin and a second node (ZAP and verifiers reload it)."""
    for name in ("citadel", "meshctl", "nodeagent-b"):
        if not (keydir / f"{name}.key").exists():
            keys.generate(keydir, name)
    return keydir


@pytest.fixture
def cp(mesh_keys: Path, loops: Any) -> Iterator[ControlPlane]:
    plane = ControlPlane(mesh_keys, loops)
    yield plane
    plane.close()


@pytest.fixture
def records() -> Iterator[Records]:
    with node_agent_logs() as lines:
        yield lines


@pytest.fixture
def nodes(cp: ControlPlane, loops: Any) -> Iterator[Any]:
    made: list[Node] = []

    def make(name: str = "nodeagent", **kw: Any) -> Node:
        made.append(Node(cp, loops, name, **kw))
        return made[-1]
    yield make
    for node in made:
        node.close()


def openssl(*args: str | Path) -> str:
    out = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_workload_file_is_registered_and_gets_a_verifiable_spiffe_certificate(cp, nodes) -> None:
    node = nodes()
    issued = metric("zmesh_nodeagent_certificates_issued_total")
    node.add("reviews-1")
    assert wait_for(lambda: cp.registered().get("reviews-1") == "nodeagent", timeout=5)
    assert wait_for(lambda: node.version("reviews-1"), timeout=5)
    d = node.certs("reviews-1")
    assert sorted(p.name for p in d.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem", "version"]
    assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700

    chain = split_pem((d / "cert-chain.pem").read_text())
    (node.run / "leaf.pem").write_text(chain[0])
    (node.run / "untrusted.pem").write_text("".join(chain[1:]) or chain[0])
    assert "leaf.pem: OK" in openssl("verify", "-CAfile", d / "root-cert.pem",
                                     "-untrusted", node.run / "untrusted.pem", node.run / "leaf.pem")
    text = openssl("x509", "-text", "-noout", "-in", node.run / "leaf.pem")
    assert f"URI:{REVIEWS}" in text
    # the certificate is for the key on disk
    key = serialization.load_pem_private_key((d / "key.pem").read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(serialization.Encoding.PEM, spki)
            == node.leaf("reviews-1").public_key().public_bytes(serialization.Encoding.PEM, spki))
    assert metric("zmesh_nodeagent_certificates_issued_total") > issued
    assert 0 < metric("zmesh_nodeagent_cert_expiry_seconds") <= TTL

    # a replica with the same service account shares the identity; another account gets its own,
    # here announced over the local RPC as a per-pod agent does
    node.add("reviews-2", ip="10.0.0.2")
    assert wait_for(lambda: node.version("reviews-2"), timeout=5)
    local = RpcClient(f"ipc://{node.run}/agent.sock", None, "nodeagent", timeout=2)
    try:
        reply = local.call("add_workload", {"id": "ratings-1", "namespace": "default",
                                            "service_account": "ratings", "ip": "10.0.0.3"})
        assert reply == {"id": "ratings-1", "identity": "spiffe://cluster.local/ns/default/sa/ratings",
                         "certs": str(node.certs("ratings-1"))}
        assert wait_for(lambda: node.version("ratings-1"), timeout=5)
        assert node.leaf("ratings-1").public_key() != node.leaf("reviews-1").public_key()
        assert wait_for(lambda: node.leaf("reviews-2") == node.leaf("reviews-1"), timeout=5)
        assert set(cp.registered()) == {"reviews-1", "reviews-2", "ratings-1"}
        rows = {r["id"]: r for r in local.call("status")}
        assert all(r["registered"] and r["version"] for r in rows.values())
        with pytest.raises(RpcError, match="namespace"):
            local.call("add_workload", {"id": "x", "namespace": "Not/Valid", "ip": "10.0.0.9"})

        # removal: deregistered from pilot, and the key material is gone from disk
        assert local.call("remove_workload", {"id": "ratings-1"}) == {"removed": True}
        (node.workloads / "reviews-1.yaml").unlink()
        assert wait_for(lambda: set(cp.registered()) == {"reviews-2"}, timeout=5)
        assert wait_for(lambda: not node.certs("ratings-1").exists() and not node.certs("reviews-1").exists(),
                        timeout=5)
        assert node.version("reviews-2")
    finally:
        local.close()


def test_certificates_rotate_before_they_expire(cp, nodes) -> None:
    node = nodes()
    node.add("reviews-1")
    assert wait_for(lambda: node.version("reviews-1"), timeout=5)
    seen = [(node.version("reviews-1"), node.leaf("reviews-1").not_valid_after_utc.timestamp(), time.time())]
    deadline = time.time() + 2.5 * TTL
    while len(seen) < 3 and time.time() < deadline:
        version = node.version("reviews-1")
        if version != seen[-1][0]:
            seen.append((version, node.leaf("reviews-1").not_valid_after_utc.timestamp(), time.time()))
        time.sleep(0.02)
    assert len(seen) == 3, seen
    for (_, old_expiry, _), (_, new_expiry, arrived) in itertools.pairwise(seen):
        assert arrived < old_expiry - 0.5  # the new set was in place well before the old one expired
        assert new_expiry > old_expiry


def test_no_private_key_travels_on_the_bus(cp, nodes) -> None:
    node = nodes()
    node.add("reviews-1")
    node.add("ratings-1", sa="ratings", ip="10.0.0.3")
    assert wait_for(lambda: node.version("reviews-1") and node.version("ratings-1"), timeout=5)
    first = node.version("reviews-1")
    assert wait_for(lambda: node.version("reviews-1") != first, timeout=2 * TTL)  # and one renewal
    sent = [(m, body) for m, peer, body in cp.requests if peer == "nodeagent"]
    assert {m for m, _ in sent} >= {"register", "sign_batch"}
    csrs = [r["csr"] for m, body in sent if m == "sign_batch" for r in body["requests"]]
    assert len(csrs) >= 3
    assert all("PRIVATE" not in repr(body) for _, body in sent)
    assert all("CERTIFICATE REQUEST" in csr for csr in csrs)
    assert b"PRIVATE KEY" in (node.certs("reviews-1") / "key.pem").read_bytes()  # it exists, on disk only


def test_citadel_outage_keeps_the_old_certificate_and_recovers(cp, nodes, records) -> None:
    node = nodes(cert_ttl=6, rpc_timeout=0.3)  # a little more life, to watch several retries
    node.add("reviews-1")
    assert wait_for(lambda: node.version("reviews-1"), timeout=5)
    before = node.version("reviews-1")
    expiry = node.leaf("reviews-1").not_valid_after_utc.timestamp()
    failures = metric("zmesh_nodeagent_certificate_renewal_failures_total", reason="unreachable")
    cp.stop_citadel()  # before the renewal at about half the lifetime: the outage spans it
    assert wait_for(lambda: len(records.matching("certificate request failed; retrying")) >= 2, timeout=6)
    retries = records.matching("certificate request failed; retrying")
    assert all(r["reason"] == "unreachable" and r["identity"] == REVIEWS and r["workloads"] == "reviews-1"
               for r in retries)
    lefts = [r["cert_left_s"] for r in retries]
    assert all(isinstance(x, float) and 0 < x < 6 for x in lefts) and lefts == sorted(lefts, reverse=True)
    assert node.version("reviews-1") == before  # still serving the certificate in force
    assert metric("zmesh_nodeagent_certificate_renewal_failures_total", reason="unreachable") >= failures + 2

    cp.start_citadel()
    assert wait_for(lambda: node.version("reviews-1") != before, timeout=5)
    assert node.leaf("reviews-1").not_valid_after_utc.timestamp() > expiry
    assert records.matching("certificate issued")[-1]["workloads"] == "reviews-1"


def test_a_node_agent_cannot_obtain_another_nodes_identity(cp, nodes, records) -> None:
    a = nodes("nodeagent")
    b = nodes("nodeagent-b")
    a.add("reviews-1")
    b.add("details-1", sa="details", ip="10.0.0.5")
    assert wait_for(lambda: a.version("reviews-1") and b.version("details-1"), timeout=5)
    assert cp.registered() == {"reviews-1": "nodeagent", "details-1": "nodeagent-b"}

    # node b's credentials asking for an identity that only runs on node a
    _key, csr = new_key_and_csr(REVIEWS)
    client = RpcClient(cp.citadel_upstream.rpc, Keyring(cp.keydir, "nodeagent-b"), "citadel", timeout=2)
    try:
        try:
            reply = client.call("sign", {"csr": csr, "ttl_s": TTL})
            refusal = f"{reply.get('refused')}: {reply.get('detail')}"
        except RpcError as exc:
            refusal = str(exc)
    finally:
        client.close()
    assert "not_on_node" in refusal and "nodeagent-b" in refusal

    # nor can node a's agent move node b's workload to node a: it does not own that registration
    pilot = RpcClient(cp.pilot_upstream.rpc, Keyring(cp.keydir, "nodeagent"), "pilot", timeout=2)
    try:
        with pytest.raises(RpcError, match="not_owner"):
            pilot.call("register", {"id": "details-1", "namespace": "default", "service_account": "details",
                                    "ip": "10.0.0.5", "node": "nodeagent"})
    finally:
        pilot.close()
    assert cp.registered() == {"reviews-1": "nodeagent", "details-1": "nodeagent-b"}

    # the agent's own path: pilot no longer lists its workload on node b, so its renewal is refused;
    # its next heartbeat ("renewed: 0") registers the workload again and the retries succeed
    refused = metric("zmesh_nodeagent_certificate_renewal_failures_total", reason="refused")
    version = b.version("details-1")
    cp.pilot_loop.call_sync(lambda: cp.pilot.registry.registrations.deregister("details-1"))
    assert wait_for(lambda: records.matching("certificate request failed; retrying"), timeout=TTL)
    failure = records.matching("certificate request failed; retrying")[0]
    assert failure["reason"] == "refused" and failure["node"] == "nodeagent-b"
    assert "nodeagent-b" in failure["error"] and failure["workloads"] == "details-1"
    assert metric("zmesh_nodeagent_certificate_renewal_failures_total", reason="refused") > refused
    assert b.version("details-1") == version
    assert wait_for(lambda: cp.registered().get("details-1") == "nodeagent-b", timeout=6)
    assert wait_for(lambda: b.version("details-1") != version, timeout=3)


def test_a_root_rotation_moves_workloads_to_the_new_root(cp, nodes, records) -> None:
    node = nodes(cert_ttl=600)  # no renewal due: only the rotation re-issues
    node.add("reviews-1")
    assert wait_for(lambda: node.version("reviews-1"), timeout=5)
    d = node.certs("reviews-1")
    [old_root] = split_pem((d / "root-cert.pem").read_text())
    admin = RpcClient(cp.citadel_upstream.rpc, Keyring(cp.keydir, "meshctl"), "citadel", timeout=2)
    try:
        new = admin.call("rotate_root", {})
    finally:
        admin.close()

    def fingerprints() -> list[str]:
        return [x509.load_pem_x509_certificate(p.encode()).fingerprint(hashes.SHA256()).hex()
                for p in split_pem((d / "root-cert.pem").read_text())]
    # both roots while workloads move; once ours moved citadel retires the old one (no grace here)
    assert wait_for(lambda: fingerprints() == [new["fingerprint"]], timeout=5)
    assert [r["roots"] for r in records.matching("trust bundle")][-2:] == [2, 1]
    assert len(records.matching("re-issuing for the new trust bundle")) == 1  # not again when one goes
    assert wait_for(lambda: len(records.matching("certificate issued")) == 2, timeout=5)
    chain = split_pem((d / "cert-chain.pem").read_text())
    (node.run / "leaf.pem").write_text(chain[0])
    assert "OK" in openssl("verify", "-CAfile", d / "root-cert.pem", node.run / "leaf.pem")
    (node.run / "old.pem").write_text(old_root)
    out = subprocess.run(["openssl", "verify", "-CAfile", node.run / "old.pem", node.run / "leaf.pem"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode != 0  # the workload's certificate is the new root's


def test_pilot_losing_the_registrations_makes_the_agent_register_again(mesh_keys, loops) -> None:
    plane = ControlPlane(mesh_keys, loops, lease=1.5)  # heartbeats every 0.5 s
    node = Node(plane, loops)
    try:
        node.add("reviews-1")
        assert wait_for(lambda: "reviews-1" in plane.registered(), timeout=5)
        plane.pilot_loop.call_sync(lambda: plane.pilot.registry.registrations.deregister("reviews-1"))
        assert "reviews-1" not in plane.registered()
        assert wait_for(lambda: "reviews-1" in plane.registered(), timeout=3)  # "renewed: 0" -> register
        time.sleep(2.0)  # longer than the lease: the heartbeats keep it
        assert plane.registered() == {"reviews-1": "nodeagent"}
    finally:
        node.close()
        plane.close()


def test_the_relay_gives_local_proxies_pilots_config_over_private_ipc(cp, nodes, loops, mesh_keys) -> None:
    node = nodes()
    for sock in ("cfg.pub", "cfg.snap", "agent.sock"):
        assert stat.S_IMODE((node.run / sock).stat().st_mode) == 0o600
        assert stat.S_ISSOCK((node.run / sock).stat().st_mode)
    node.add("reviews-1")
    assert wait_for(lambda: "reviews-1" in cp.registered(), timeout=5)
    proxy = subscriber(loops("proxy"), mesh_keys, None, prefix="cfg/", name="proxy-a",
                       pub_endpoint=f"ipc://{node.run}/cfg.pub", snapshot_endpoint=f"ipc://{node.run}/cfg.snap")
    # what pilot publishes for the workload's group reaches the local subscriber, signature intact
    assert wait_for(lambda: any(k.startswith("cfg/g/") for k in proxy.items()), timeout=5)
    published = cp.pilot_loop.call_sync(lambda: sorted(e.topic for e in cp.pilot_pub.store.subtree("cfg/")))
    assert wait_for(lambda: sorted(proxy.items()) == published, timeout=5)
    cp.pilot_pub.set("cfg/o/test/extra", {"hello": 1})
    assert wait_for(lambda: proxy.get("cfg/o/test/extra") == {"hello": 1}, timeout=5)


def test_a_certificate_from_a_new_root_is_held_until_peers_can_trust_that_root(mesh_keys, loops,
                                                                              records) -> None:
    """Citadel signs with a new root at once; proxies reload the bundle on a tick. Installing the new
    certificate before every peer trusts its root would get it refused, so the agent writes the bundle
    first and the certificate only once the root has been known for `trust_settle_s`."""
    plane = ControlPlane(mesh_keys, loops, retire_grace_s=30.0)  # the old root stays: watch the first step
    node = Node(plane, loops, cert_ttl=600, trust_settle_s=3.0)
    admin = RpcClient(plane.citadel_upstream.rpc, Keyring(plane.keydir, "meshctl"), "citadel", timeout=2)
    try:
        node.add("reviews-1")
        assert wait_for(lambda: node.version("reviews-1"), timeout=5)
        assert records.matching("certificate held until its root has settled") == []  # the first root
        d = node.certs("reviews-1")
        [old_root] = split_pem((d / "root-cert.pem").read_text())
        new = admin.call("rotate_root", {})
        assert wait_for(lambda: records.matching("certificate held until its root has settled"), timeout=5)
        [held] = records.matching("certificate held until its root has settled")
        assert held["identity"] == REVIEWS and 0 < held["hold_s"] <= 3.0
        # the files: both roots already, the old root's certificate still
        roots = split_pem((d / "root-cert.pem").read_text())
        assert len(roots) == 2 and old_root in roots
        old = x509.load_pem_x509_certificate(old_root.encode())
        node.leaf("reviews-1").verify_directly_issued_by(old)
        assert len(records.matching("certificate issued")) == 1

        assert wait_for(lambda: len(records.matching("certificate issued")) == 2, timeout=6)
        assert node.leaf("reviews-1").issuer.rfc4514_string() == new["subject"]
        assert split_pem((d / "root-cert.pem").read_text()) == roots
    finally:
        admin.close()
        node.close()
        plane.close()


def test_a_reader_that_sees_one_version_around_its_reads_holds_one_set(tmp_path: Path) -> None:
    """The readers' protocol (tls.py's): read `version`, the files, `version` again; no `version` means
    a write is under way. Against a writer swapping two sets back and forth, every set a reader
    accepts must be one the writer wrote, never a new key beside the old chain."""
    sets = [CertSet(f"key {i}\n".encode(), [f"chain {i}\n"], [f"root {i}\n"]) for i in range(2)]
    by_version = {s.version: s for s in sets}
    certs = CertDir(tmp_path, "w", (os.getuid(), os.getgid()))
    certs.write(sets[0])
    d = tmp_path / "w"
    stop = threading.Event()

    def writer() -> None:
        for n in range(200):
            certs.write(sets[n % 2])
        stop.set()
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    accepted, mixed = 0, []
    deadline = time.monotonic() + 30
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            before = (d / "version").read_text().strip()
            got = ((d / "key.pem").read_bytes(), (d / "cert-chain.pem").read_text(),
                   (d / "root-cert.pem").read_text())
            if (d / "version").read_text().strip() != before:
                continue
        except FileNotFoundError:
            continue
        accepted += 1
        want = by_version[before]
        if got != (want.key_pem, "".join(want.chain), "".join(want.roots)):
            mixed.append((before, got))
    thread.join(10)
    assert stop.is_set() and accepted > 0
    assert mixed == []
