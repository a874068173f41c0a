"""Citadel on the bus: CSR signing over CURVE RPC, the trust bundle on a signed publisher, a root
rotation end to end, meshctl's commands, and the `citadel` process itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from click.testing import CliRunner

from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher, Subscriber
from bus.rpc import RpcClient, RpcError, RpcServer, RpcTimeout
from bus.signing import Signer, Verifier
from controlplane.citadel.authz import RegistrationsAuthorizer, StaticAuthorizer, pilot_rpc
from controlplane.citadel.ca import CertificateAuthority, Issued, Refused
from controlplane.citadel.cli import ca_group
from controlplane.citadel.pki import SigningCa, new_root
from controlplane.citadel.service import BUNDLE_KEY, MAX_BATCH, Citadel, serve_rpc
from controlplane.citadel.store import CaDir
from controlplane.pilot.xds.server import Pilot
from controlplane.pilot.xds.server import serve_rpc as serve_pilot
from tests.bus.helpers import publisher, raw_client
from tests.citadel.helpers import DB, TD, WEB, csr_pem, openssl, write_chain
from tests.conftest import ROOT, metric, stop, wait_for

NODES = {"nodeagent": [("default", "web")], "proxy-a": [("prod", "db")]}


@pytest.fixture(scope="module")
def mesh_keys(keydir: Path) -> Path:
    """The session's key directory, which holds citadel's and the operator's (`meshctl`) keys
    from the start: the ZAP allow-list serves the whole process and reloads at most once a
    second, so a key added mid-session could be refused for that second."""
    return keydir


@dataclass
class Harness:
    keydir: Path
    loop: Loop
    ca: CertificateAuthority
    citadel: Citadel
    publisher: Publisher
    rpc: RpcServer
    wire: zmq.Socket  # a raw SUB to everything citadel publishes
    replies: list[Any]
    clients: list[RpcClient]

    def client(self, name: str, **kw: Any) -> RpcClient:
        c = RpcClient(self.rpc.endpoint, Keyring(self.keydir, name), "citadel", origin=name,
                      timeout=kw.pop("timeout", 2.0), retries=kw.pop("retries", 1))
        self.clients.append(c)
        return c

    def call(self, name: str, method: str, body: Any = None) -> Any:
        reply = self.client(name).call(method, body)
        self.replies.append(reply)
        return reply

    def sign(self, node: str, spiffe: str = WEB) -> dict:
        return self.call(node, "sign", {"csr": csr_pem(spiffe)})

    def published(self) -> list[bytes]:
        frames = []
        while self.wire.poll(50):
            frames += self.wire.recv_multipart()
        return frames


@pytest.fixture
def mesh(mesh_keys, loops, tmp_path) -> Iterator[Harness]:
    loop = loops("citadel")
    store = CaDir(tmp_path / "ca")
    signing, retiring, tracker = store.load_or_create(TD, time.time())
    ca = CertificateAuthority(signing, StaticAuthorizer(NODES), retiring=retiring, tracker=tracker,
                              store=store)
    ring = Keyring(mesh_keys, "citadel")
    pub = loop.call_sync(lambda: Publisher(
        loop, pub_endpoint="tcp://127.0.0.1:*", snapshot_endpoint="tcp://127.0.0.1:*", keyring=ring,
        signer=Signer("citadel", ring.signing_key()), name="citadel", hb_interval=0.2))
    wire = raw_client(zmq.SUB, mesh_keys, "proxy-b", pub.pub_endpoint, server="citadel")
    wire.subscribe(b"")
    # joined (welcomed with a heartbeat) before citadel publishes anything
    assert wire.poll(5000), "the publisher never welcomed the capture socket"
    citadel = loop.call_sync(lambda: Citadel(loop, ca, pub))
    rpc = loop.call_sync(lambda: serve_rpc(loop, citadel, "tcp://127.0.0.1:*", ring))
    harness = Harness(mesh_keys, loop, ca, citadel, pub, rpc, wire, [], [])
    yield harness
    for c in harness.clients:
        c.close()
    wire.close(0)


def bundle_subscriber(mesh: Harness, loops) -> Subscriber:
    loop = loops("node")
    ring = Keyring(mesh.keydir, "nodeagent")
    return loop.call_sync(lambda: Subscriber(
        loop, pub_endpoint=mesh.publisher.pub_endpoint, snapshot_endpoint=mesh.publisher.snapshot_endpoint,
        prefix="ca/", keyring=ring, server="citadel", verifier=Verifier(ring.trusted_signers),
        name="nodeagent", silence_timeout=1.0, snapshot_timeout=0.5))


def test_a_node_agent_gets_its_workload_certificate_over_curve(mesh, tmp_path) -> None:
    before = metric("zmesh_citadel_certs_issued_total")
    reply = mesh.sign("nodeagent")
    assert set(reply) == {"chain", "root", "expires", "ttl_s", "serial", "spiffe_id"}
    root, _, leaf = write_chain(tmp_path, reply)
    openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(root), str(leaf))
    assert f"URI:{WEB}" in openssl("x509", "-text", "-noout", "-in", str(leaf)).stdout
    assert metric("zmesh_citadel_certs_issued_total") == before + 1
    # the node is the CURVE key that asks, not anything in the body
    refused = mesh.call("proxy-a", "sign", {"csr": csr_pem(WEB), "node": "nodeagent"})
    assert refused["refused"] == "not_on_node" and "'proxy-a'" in refused["detail"]
    assert mesh.sign("proxy-a", DB)["spiffe_id"] == DB
    unknown = mesh.sign("proxy-b")
    assert unknown["refused"] == "unknown_node"


def test_a_batch_is_signed_in_order_each_request_on_its_own_merits(mesh, tmp_path) -> None:
    before = metric("zmesh_citadel_certs_issued_total")
    reply = mesh.call("nodeagent", "sign_batch", {"requests": [
        {"csr": csr_pem(WEB)}, {"csr": csr_pem(DB)}, {"csr": "garbage"}, {"csr": csr_pem(WEB), "ttl_s": 60}]})
    web, db, garbage, short = reply["results"]
    assert web["spiffe_id"] == WEB and short["spiffe_id"] == WEB and short["ttl_s"] == 60
    assert db["refused"] == "not_on_node"  # proxy-a's workload, not this node's
    assert garbage["refused"] == "malformed_csr"
    assert metric("zmesh_citadel_certs_issued_total") == before + 2
    root, _, leaf = write_chain(tmp_path, short)
    openssl("verify", "-x509_strict", "-CAfile", str(root), str(leaf))
    too_many = {"requests": [{"csr": "x"}] * (MAX_BATCH + 1)}
    for bad in ({"requests": []}, too_many, {"csr": csr_pem(WEB)}, None):
        with pytest.raises(RpcError, match="1 to 256 sign bodies"):
            mesh.call("nodeagent", "sign_batch", bad)


def test_node_authorization_asks_the_real_pilot_over_the_bus(mesh_keys, loops) -> None:
    """Node agents register workloads with pilot under their CURVE identity; citadel asks pilot
    (`workloads`) which identities run on the asking node."""
    pilot_loop = loops("pilot")
    ring = Keyring(mesh_keys, "pilot")
    pub = publisher(pilot_loop, mesh_keys, name="pilot")
    pilot = pilot_loop.call_sync(lambda: Pilot(pilot_loop, pub))
    server = pilot_loop.call_sync(lambda: serve_pilot(pilot_loop, pilot, "tcp://127.0.0.1:*", ring))

    def register(node: str, wid: str, namespace: str, account: str) -> None:
        client = RpcClient(server.endpoint, Keyring(mesh_keys, node), "pilot", origin=node)
        try:
            client.call("register", {"id": wid, "namespace": namespace, "ip": "10.0.0.1",
                                     "service_account": account, "node": "someone-else"})
        finally:
            client.close()

    register("nodeagent", "web-1", "default", "web")
    call = pilot_rpc(loops("citadel-pilot"), server.endpoint, Keyring(mesh_keys, "citadel"), timeout=0.3)
    cert, key = new_root(TD, time.time())
    ca = CertificateAuthority(SigningCa(cert, key), RegistrationsAuthorizer(call, recheck_s=0.0))

    def sign(node: str, spiffe: str) -> Issued | Refused:
        return ca.sign(node, {"csr": csr_pem(spiffe)}, time.time())

    assert isinstance(sign("nodeagent", WEB), Issued)
    assert sign("proxy-a", WEB).code == "unknown_node"  # the body's "node" did not count
    register("proxy-a", "db-1", "prod", "db")
    assert isinstance(sign("proxy-a", DB), Issued)
    assert sign("proxy-a", WEB).code == "not_on_node"
    assert sign("nodeagent", DB).code == "not_on_node"
    pilot_loop.stop()  # pilot goes away: one bounded wait, then fast refusals
    started = time.monotonic()
    assert sign("proxy-b", WEB).code == "authorizer_unavailable"
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    assert sign("proxy-b", WEB).code == "authorizer_unavailable"
    assert time.monotonic() - started < 0.1


def test_an_unknown_curve_key_is_refused_by_zap(mesh, outsider_dir, tmp_path) -> None:
    ring = tmp_path / "intruder-ring"
    ring.mkdir()
    for f in ("intruder.key", "intruder.key_secret"):
        shutil.copy(outsider_dir / f, ring / f)
    shutil.copy(mesh.keydir / "citadel.key", ring / "citadel.key")
    before = metric("zmesh_bus_auth_failures_total", side="server", reason="unknown_key")
    # retries=0: RpcClient's retry is a blocking send, and a DEALER whose only peer refused it
    # has no pipe to send on, so a retry would block forever (a bus/rpc.py issue)
    client = RpcClient(mesh.rpc.endpoint, Keyring(ring, "intruder"), "citadel", origin="intruder",
                       timeout=1.0, retries=0)
    try:
        with pytest.raises(RpcTimeout, match="refused our CURVE key"):
            client.call("sign", {"csr": csr_pem()})
    finally:
        client.close()
    assert metric("zmesh_bus_auth_failures_total", side="server", reason="unknown_key") > before
    assert mesh.ca.issued == 0 and sum(mesh.ca.refused.values()) == 0  # it never reached citadel


def test_the_trust_bundle_is_published_signed(mesh, loops) -> None:
    sub = bundle_subscriber(mesh, loops)
    assert sub.wait_ready(10)
    assert sub.get(BUNDLE_KEY) == mesh.ca.bundle()
    bundle = sub.get(BUNDLE_KEY)
    assert len(bundle["roots"]) == 1 and bundle["roots"][0] == mesh.sign("nodeagent")["root"]


def test_root_rotation_end_to_end(mesh, loops, tmp_path) -> None:
    sub = bundle_subscriber(mesh, loops)
    assert sub.wait_ready(10)
    (old_root,) = sub.get(BUNDLE_KEY)["roots"]
    mesh.sign("nodeagent", WEB)
    mesh.sign("proxy-a", DB)
    with pytest.raises(RpcError, match="nodeagent is not a citadel admin"):
        mesh.client("nodeagent").call("rotate_root", {})
    runner = CliRunner()
    common = ["--keys", str(mesh.keydir), "--citadel", mesh.rpc.endpoint]
    result = runner.invoke(ca_group, ["rotate-root", *common, "--as", "meshctl"])
    assert result.exit_code == 0, result.output
    assert "2 identities to re-issue" in result.output
    assert wait_for(lambda: len(sub.get(BUNDLE_KEY)["roots"]) == 2, timeout=10)
    new_root, still_old = sub.get(BUNDLE_KEY)["roots"]
    assert still_old == old_root
    status = mesh.call("meshctl", "status")
    assert status["rotation"] | {"phase": "rotating", "total": 2, "reissued": 0} == status["rotation"]
    web = mesh.sign("nodeagent", WEB)
    (tmp_path / "new.pem").write_text(new_root)
    openssl("verify", "-CAfile", str(tmp_path / "new.pem"), str(write_chain(tmp_path, web)[2]))
    result = runner.invoke(ca_group, ["status", *common])  # as meshctl, the default
    assert result.exit_code == 0, result.output
    assert "rotation: rotating" in result.output and "1 of 2 identities re-issued" in result.output
    assert "retiring" in result.output
    assert len(sub.get(BUNDLE_KEY)["roots"]) == 2
    mesh.sign("proxy-a", DB)
    assert wait_for(lambda: sub.get(BUNDLE_KEY)["roots"] == [new_root], timeout=10)
    status = mesh.call("meshctl", "status")
    assert status["rotation"] == {"phase": "idle"} and [r["role"] for r in status["roots"]] == ["signing"]
    assert status["issued"] == 4
    result = runner.invoke(ca_group, ["status", *common, "-o", "json"])
    assert json.loads(result.output)["bundle_version"] == sub.get(BUNDLE_KEY)["version"]


def test_no_private_key_ever_crosses_the_bus(mesh) -> None:
    mesh.sign("nodeagent", WEB)
    mesh.sign("proxy-a", WEB)  # refused
    mesh.call("meshctl", "rotate_root", {})
    mesh.sign("nodeagent", WEB)
    mesh.call("meshctl", "status")
    with pytest.raises(RpcError):
        mesh.client("nodeagent").call("rotate_root", {})  # an error reply
    published = mesh.published()
    wire = b"".join(published)
    assert wire.count(b"BEGIN CERTIFICATE") >= 3  # the capture works: bundles with one, then two roots
    assert b"PRIVATE KEY" not in wire
    for frame in published:
        assert b"PRIVATE KEY" not in repr(_unpack(frame)).encode()
    assert len(mesh.replies) == 5
    assert "PRIVATE KEY" not in json.dumps(mesh.replies)


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException):
        return frame


def test_the_citadel_process_serves_metrics_and_keeps_its_root(mesh_keys, tmp_path) -> None:
    base = 12000 + os.getpid() % 300 * 30  # below Linux's ephemeral ports and the other tests' bases
    ca_dir = tmp_path / "ca"
    cmd = [sys.executable, "-c", "from controlplane.citadel.cli import citadel_command; citadel_command()",
           "--keys", str(mesh_keys), "--ca-dir", str(ca_dir), "--port-base", str(base), "--trust-node-agents"]

    def run_once() -> tuple[str, str]:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = RpcClient(f"tcp://127.0.0.1:{base + 22}", Keyring(mesh_keys, "nodeagent"), "citadel",
                           origin="nodeagent", timeout=1.0, retries=15)
        try:
            reply = client.call("sign", {"csr": csr_pem(DB)})
            assert reply["spiffe_id"] == DB, reply
            url = f"http://127.0.0.1:{base + 29}/metrics"
            metrics = urllib.request.urlopen(url, timeout=5).read().decode()
            assert "zmesh_citadel_certs_issued_total 1.0" in metrics
            assert "zmesh_citadel_root_expiry_seconds 3.15" in metrics  # ~10 years
            fingerprint = client.call("status")["signing_ca"]["fingerprint"]
        finally:
            client.close()
            err = stop(proc)
            print(err)  # shown if the test fails
        assert proc.returncode == 0, "citadel did not stop cleanly on SIGTERM"
        assert "INSECURE: --trust-node-agents" in err
        return fingerprint, err

    first, err = run_once()
    assert "msg=issued" in err and f"spiffe_id={DB}" in err and "node=nodeagent" in err
    assert oct(os.stat(ca_dir / "root-key.pem").st_mode & 0o777) == "0o600"
    second, _ = run_once()
    assert second == first
    assert json.loads((ca_dir / "issued.json").read_text())["records"][0][:2] == ["nodeagent", DB]
