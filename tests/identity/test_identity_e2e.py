"""Issue 6 end to end: citadel -> node agent -> certificate files -> sidecar processes -> live mTLS traffic.

A real pilot and citadel (in-process, real sockets, tests/nodeagent/helpers.py), a real node agent
writing `<run-dir>/certs/<id>/`, and two `meshctl proxy --certs` processes: a client sidecar whose
outbound ISTIO_MUTUAL clusters reach a server sidecar's STRICT inbound port in front of a tiny
backend. A client loop records every request's outcome, so "zero failures" is counted, not sampled.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bus.keys import Keyring
from bus.rpc import RpcClient
from controlplane.citadel import pki
from nodeagent.certs import CertDir, CertSet, split_pem
from tests.conftest import free_port, wait_for
from tests.identity.sidecars import Sidecar, Traffic, client_config, presented, server_config
from tests.nodeagent.helpers import ControlPlane, Node, Records, node_agent_logs
from tests.proxy.l7helpers import Backend, reply

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
ANSWER = b"hello from the server"


class Mesh:
    """Control plane, one node agent with a client and a server workload, their sidecars, a backend."""

    def __init__(self, keydir: Path, loops: Any, tmp: Path, *, ttl: int, retire_grace_s: float = 0.0,
                 **node_kw: Any) -> None:
        self.closers: list[Callable[[], Any]] = []
        self.tmp = tmp
        try:
            self._start(keydir, loops, ttl, retire_grace_s, node_kw)
        except BaseException:
            self.close()  # whatever started before the failure
            raise

    def _start(self, keydir: Path, loops: Any, ttl: int, retire_grace_s: float,
               node_kw: dict[str, Any]) -> None:
        self.cp = ControlPlane(keydir, loops, retire_grace_s=retire_grace_s)
        self.closers.append(self.cp.close)
        self.node = Node(self.cp, loops, cert_ttl=ttl, **node_kw)
        self.closers.append(self.node.close)
        self.node.add("client-1", sa="client", ip="10.0.0.1")
        self.node.add("server-1", sa="server", ip="10.0.0.2")
        assert wait_for(lambda: self.node.version("client-1") and self.node.version("server-1"), timeout=10)
        self.app = Backend(lambda _c, _seen: reply(200, ANSWER))
        self.closers.append(self.app.close)
        self.server = self.sidecar("server-1", server_config(self.app.port), self.node.certs("server-1"))
        self.pooled, self.fresh = free_port(), free_port()
        config = client_config(self.server.inbound_port, self.pooled, self.fresh, SERVER_ID)
        self.client = self.sidecar("client-1", config, self.node.certs("client-1"))
        self.server.wait_listening(self.server.inbound_port)
        self.client.wait_listening(self.pooled)
        self.client.wait_listening(self.fresh)

    def sidecar(self, wid: str, config: dict[str, Any], certs: Path) -> Sidecar:
        side = Sidecar(self.tmp, wid, config, certs)
        self.closers.append(side.close)
        return side

    def traffic(self) -> Traffic:
        t = Traffic(self.pooled, self.fresh, ANSWER)
        self.closers.append(t.stop)
        assert t.flowing(), (t.outcomes[-5:], self.client.log()[-2000:], self.server.log()[-2000:])
        return t

    def served(self) -> x509.Certificate:
        """What the server sidecar presents now to a new connection made with the client's files."""
        return presented(self.server.inbound_port, self.node.certs("client-1"))

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


@pytest.fixture
def mesh(keydir: Path, loops: Any, tmp_path: Path) -> Iterator[Callable[..., Mesh]]:
    made: list[Mesh] = []

    def make(**kw: Any) -> Mesh:
        made.append(Mesh(keydir, loops, tmp_path, **kw))
        return made[-1]
    try:
        yield make
    finally:
        for m in made:
            m.close()


@pytest.fixture
def records() -> Iterator[Records]:
    with node_agent_logs() as lines:
        yield lines


def issued_by(cert_pem_or_cert: str | x509.Certificate, root_pem: str) -> bool:
    cert = (cert_pem_or_cert if isinstance(cert_pem_or_cert, x509.Certificate)
            else x509.load_pem_x509_certificate(cert_pem_or_cert.encode()))
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem.encode()))
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def assert_clean(m: Mesh, traffic: Traffic) -> None:
    """Zero failed requests, counted by our client and by both sidecars."""
    traffic.stop()
    loads = [line for side in (m.client, m.server) for line in side.log().splitlines()
             if "certificates" in line]  # when each sidecar took which set, to read a failure against
    assert traffic.failures() == [], (traffic.failures()[:10], loads)
    assert traffic.count("pooled") > 0 and traffic.count("fresh") > 0
    for side in (m.client, m.server):  # each sidecar runs the set the node agent wrote last
        assert wait_for(lambda side=side: side.loaded() == m.node.version(side.wid), timeout=3), side.wid
    client, server = m.client.requests(), m.server.requests()
    assert set(client) == {("200", "-")}, client
    assert set(server) == {("200", "-")}, server
    assert client[("200", "-")] == traffic.count()


def test_certificates_rotate_under_live_traffic_without_a_failed_request(mesh) -> None:
    m = mesh(ttl=4)
    traffic = m.traffic()
    serials = [m.served().serial_number]
    client_versions = {m.node.version("client-1")}
    deadline = time.monotonic() + 20
    # two rotations of each workload, the server's seen on the wire
    while (len(serials) < 3 or len(client_versions) < 3) and time.monotonic() < deadline:
        serial = m.served().serial_number
        if serial != serials[-1]:
            serials.append(serial)
        client_versions.add(m.node.version("client-1"))
        time.sleep(0.1)
    assert len(serials) >= 3 and len(set(serials)) == len(serials), serials
    assert len(client_versions) >= 3, client_versions
    assert wait_for(lambda: m.served().serial_number == m.node.leaf("server-1").serial_number, timeout=3)
    assert traffic.flowing()
    assert_clean(m, traffic)


def test_a_citadel_outage_longer_than_a_rotation_keeps_traffic_flowing(mesh, records) -> None:
    ttl = 22  # renewals 8.8-13.2 s apart
    m = mesh(ttl=ttl)
    traffic = m.traffic()
    leaves = {w: m.node.leaf(w) for w in ("client-1", "server-1")}
    versions = {w: m.node.version(w) for w in leaves}
    expiry = min(c.not_valid_after_utc.timestamp() for c in leaves.values())
    interval = max(r["renew_in_s"] for r in records.matching("certificate issued"))  # the agent's plan
    m.cp.stop_citadel()
    until = time.time() + interval + 0.5  # longer than a rotation interval

    def failed(identity: str) -> list[dict[str, Any]]:
        retries = records.matching("certificate request failed; retrying")
        return [r for r in retries if r["identity"] == identity]
    # both renewals fall inside the outage and fail, again and again; each time the node agent says
    # how long the certificates in force have left
    assert wait_for(lambda: len(failed(CLIENT_ID)) >= 2 and len(failed(SERVER_ID)) >= 2,
                    timeout=expiry - 2.5 - time.time())
    time.sleep(max(0.0, until - time.time()))
    assert time.time() < expiry - 2.5, "the mesh took too long to start for this outage to fit"
    retries = records.matching("certificate request failed; retrying")
    assert all(r["reason"] == "unreachable" and 0 < r["cert_left_s"] < ttl for r in retries), retries
    for identity in (CLIENT_ID, SERVER_ID):
        lefts = [r["cert_left_s"] for r in failed(identity)]
        assert lefts == sorted(lefts, reverse=True), lefts
    assert {w: m.node.version(w) for w in leaves} == versions  # the certificates in force stay
    assert m.served().serial_number == leaves["server-1"].serial_number
    assert traffic.flowing()

    m.cp.start_citadel()
    assert wait_for(lambda: all(m.node.version(w) != versions[w] for w in leaves), timeout=5)
    assert all(m.node.leaf(w).not_valid_after_utc.timestamp() > expiry for w in leaves)
    assert wait_for(lambda: m.served().serial_number == m.node.leaf("server-1").serial_number, timeout=3)
    assert traffic.flowing()
    assert_clean(m, traffic)


def test_a_root_rotation_under_live_traffic_moves_both_workloads_without_a_failed_request(mesh,
                                                                                        records) -> None:
    # no renewal due: only the rotation re-issues; the old root goes 5 s after both moved, well after
    # the node agent installed the new certificates (trust_settle_s, 2 s) and the sidecars loaded them
    m = mesh(ttl=600, retire_grace_s=5.0)
    traffic = m.traffic()
    dirs = {w: m.node.certs(w) for w in ("client-1", "server-1")}
    [old_root] = split_pem((dirs["server-1"] / "root-cert.pem").read_text())
    admin = RpcClient(m.cp.citadel_upstream.rpc, Keyring(m.cp.keydir, "meshctl"), "citadel", timeout=5)
    try:
        new = admin.call("rotate_root", {})  # what `meshctl ca rotate-root` sends
    finally:
        admin.close()
    assert new["identities"] == 2
    new_root = next(r for r in m.cp.ca.bundle()["roots"] if r != old_root)

    def roots(w: str) -> list[str]:
        return split_pem((dirs[w] / "root-cert.pem").read_text())

    def moved(w: str) -> bool:
        return issued_by(split_pem((dirs[w] / "cert-chain.pem").read_text())[0], new_root)

    bundles: dict[str, list[list[str]]] = {w: [] for w in dirs}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(moved(w) and roots(w) == [new_root] for w in dirs):
        for w in dirs:
            if not bundles[w] or bundles[w][-1] != roots(w):
                bundles[w].append(roots(w))
        time.sleep(0.02)
    for w in dirs:  # old + new while the workloads move, then the new root alone
        assert moved(w), w
        assert [old_root, new_root] in bundles[w] or [new_root, old_root] in bundles[w], bundles[w]
        assert roots(w) == [new_root]
    assert [r["roots"] for r in records.matching("trust bundle")][-2:] == [2, 1]
    assert wait_for(lambda: issued_by(m.served(), new_root), timeout=3)
    assert traffic.flowing()
    assert_clean(m, traffic)


def foreign_sidecar(m: Mesh, tmp_path: Path, wid: str, *, trust_mesh: bool) -> tuple[Sidecar, int, int]:
    """A client sidecar whose certificate (the client's SPIFFE id) comes from a second CA; it trusts that
    CA, and with `trust_mesh` the mesh's root too. Returns it and its (pooled, fresh) service ports."""
    cert, key = pki.new_root("cluster.local", time.time())
    foreign = pki.SigningCa(cert, key)
    workload_key = ec.generate_private_key(ec.SECP256R1())
    spki = workload_key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    _, leaf = foreign.issue(spki, CLIENT_ID, time.time() - 60, time.time() + 3600)
    roots = [pki.pem(cert)]
    if trust_mesh:
        roots += split_pem((m.node.certs("server-1") / "root-cert.pem").read_text())
    CertDir(tmp_path / "foreign", wid, (os.getuid(), os.getgid())).write(CertSet(
        workload_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), [leaf], roots))
    pooled, fresh = free_port(), free_port()
    side = m.sidecar(wid, client_config(m.server.inbound_port, pooled, fresh, SERVER_ID),
                     tmp_path / "foreign" / wid)
    side.wait_listening(pooled)
    side.wait_listening(fresh)
    return side, pooled, fresh


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_sidecars_with_foreign_ca_certificates_are_refused_and_count_uf(mesh, tmp_path: Path) -> None:
    m = mesh(ttl=600)
    # the stranger trusts only its CA: it refuses the server; the impostor trusts the mesh's root too,
    # so the refusal is the server's (under TLS 1.3, after the client's side of the handshake is done)
    for wid, trust_mesh in (("stranger-1", False), ("impostor-1", True)):
        side, pooled, fresh = foreign_sidecar(m, tmp_path, wid, trust_mesh=trust_mesh)
        assert [get(port, f"/from/{wid}")[0] for port in (pooled, fresh, pooled, fresh)] == [503] * 4, wid
        assert side.requests() == {("503", "UF"): 4}, wid
    assert not any(s.target.startswith(b"/from/") for s in m.app.seen)
    assert m.server.requests() == {}  # refused in the handshake: nothing reached the server's HTTP
    assert get(m.pooled, "/from-the-mesh") == (200, ANSWER)  # the mesh's own client gets through
