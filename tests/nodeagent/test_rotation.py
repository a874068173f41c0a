"""The node agent's decisions without sockets: renewal timing, backoff, workload-set diffs, CSRs."""

from __future__ import annotations

import datetime
import os
import random
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bus.backoff import Backoff
from meshapi.identity import spiffe_id
from nodeagent.certs import CertDir, CertSet, chains_to, check_leaf, new_key_and_csr, split_pem
from nodeagent.rotation import Rotation
from nodeagent.workloads import Inventory, WorkloadError, parse_text, parse_workload

SPIFFE = "spiffe://cluster.local/ns/default/sa/reviews"


def wl(wid: str, sa: str = "reviews", ns: str = "default", **kw) -> dict:
    return {"id": wid, "namespace": ns, "service_account": sa, "ip": "10.0.0.1", **kw}


# -- rotation --

def test_renewal_falls_between_40_and_60_percent_of_the_remaining_lifetime() -> None:
    rng = random.Random(7)
    times = []
    for _ in range(500):
        r = Rotation(rng=rng)
        assert r.due(1000.0)
        r.started()
        assert not r.due(1000.0)  # one request in flight at a time
        times.append(r.issued(1000.0, 1000.0 + 100.0) - 1000.0)
        assert not r.due(1000.0 + times[-1] - 0.01) and r.due(1000.0 + times[-1])
    assert min(times) >= 40.0 and max(times) <= 60.0
    assert max(times) - min(times) > 15  # jittered, not in lockstep
    assert abs(sum(times) / len(times) - 50.0) < 2


def test_failures_back_off_and_keep_the_current_expiry_until_a_success() -> None:
    r = Rotation(backoff=Backoff(initial=1.0, cap=4.0), rng=random.Random(3))
    r.started()
    r.issued(0.0, 10.0)
    assert r.left(2.0) == 8.0
    now = r.next_at
    delays = []
    for _ in range(4):
        assert r.due(now)
        r.started()
        delays.append(r.failed(now))
        assert r.left(now) == 10.0 - now  # the certificate in force is still the one served
        assert not r.due(now) and r.due(now + delays[-1])
        now += delays[-1]
    assert delays == [1.0, 2.0, 4.0, 4.0]
    r.started()
    r.issued(now, now + 10.0)
    r.started()
    assert r.failed(now) == 1.0  # success reset the backoff


def test_a_new_bundle_renews_now_even_when_a_request_is_in_flight() -> None:
    r = Rotation(rng=random.Random(4))
    r.started()
    r.issued(0.0, 100.0)
    assert not r.due(1.0)
    r.renew_now()
    assert r.due(1.0)
    r.started()
    r.renew_now()  # the bundle changed again while citadel signs with what it had
    assert r.issued(2.0, 102.0) == 2.0  # that answer may predate the bundle: ask again at once
    r.started()
    assert r.issued(3.0, 103.0) > 40.0


def test_left_is_none_before_the_first_certificate_and_negative_after_expiry() -> None:
    r = Rotation()
    assert r.left(5.0) is None
    r.started()
    r.issued(0.0, 4.0)
    assert r.left(6.0) == -2.0
    with pytest.raises(ValueError):
        Rotation(renew_at=0.95, jitter=0.1)


# -- workloads --

def test_parse_yaml_json_and_refusals() -> None:
    w = parse_text("id: r1\nnamespace: default\nservice_account: reviews\nip: 10.0.0.1\n"
                   "labels: {app: reviews}\nports: {http: 9080}\n", "r1.yaml")
    assert (w.id, w.identity, w.labels, w.ports) == ("r1", ("default", "reviews"), {"app": "reviews"},
                                                     {"http": 9080})
    assert parse_text('{"id": "r2", "ip": "10.0.0.2"}', "r2.json").identity == ("default", "default")
    assert w.registration("node-1")["node"] == "node-1"
    for bad, why in [({"id": "../x", "ip": "10.0.0.1"}, "id"), ({"id": "a", "ip": "nope"}, "ip"),
                     ({**wl("a"), "ports": {"http": 70000}}, "ports"), ({**wl("a"), "extra": 1}, "unknown"),
                     ({**wl("a"), "labels": {"a": 1}}, "labels"), ([], "mapping"),
                     (wl("a", ns="Prod"), "namespace"), (wl("a", sa="a..b"), "service_account")]:
        with pytest.raises(WorkloadError, match=why):
            parse_workload(bad)
    with pytest.raises(WorkloadError, match="YAML"):
        parse_text("id: [", "x.yaml")


def test_inventory_reports_only_differences() -> None:
    inv = Inventory()
    c = inv.set("file:a.yaml", parse_workload(wl("a")))
    assert [w.id for w in c.added] == ["a"] and not c.removed and not c.changed
    assert not inv.set("file:a.yaml", parse_workload(wl("a")))  # rewritten, same content: nothing
    c = inv.set("file:a.yaml", parse_workload(wl("a", labels={"v": "2"})))
    assert [(old.labels, new.labels) for old, new in c.changed] == [({}, {"v": "2"})]
    c = inv.set("rpc:b", parse_workload(wl("b")))
    assert [w.id for w in c.added] == ["b"]
    assert {w.identity for w in inv.current.values()} == {("default", "reviews")}
    c = inv.set("file:a.yaml", None)
    assert [w.id for w in c.removed] == ["a"] and list(inv.current) == ["b"]


def test_inventory_same_id_from_two_sources_files_win() -> None:
    inv = Inventory()
    inv.set("rpc:a", parse_workload(wl("a", sa="from-rpc")))
    c = inv.set("file:a.yaml", parse_workload(wl("a", sa="from-file")))
    assert c.conflicts == [("rpc:a", "a")]
    assert [(o.service_account, n.service_account) for o, n in c.changed] == [("from-rpc", "from-file")]
    c = inv.set("file:a.yaml", None)  # the file goes: the announcement takes over again
    assert [n.service_account for _, n in c.changed] == ["from-rpc"] and not c.removed


# -- keys, CSRs and files --

def test_csr_holds_only_the_spiffe_uri_and_a_p256_key() -> None:
    key_pem, csr_pem = new_key_and_csr(spiffe_id("cluster.local", "default", "reviews"))
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.public_key().curve.name == "secp256r1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SPIFFE)]
    assert b"PRIVATE KEY" in key_pem and "PRIVATE" not in csr_pem


def _ca() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


def _leaf(ca: tuple[ec.EllipticCurvePrivateKey, str], public_key, uri: str, not_after: float) -> str:
    """A leaf as a CA would sign it (self-contained: citadel's internals are not under test here)."""
    issuer = x509.load_pem_x509_certificate(ca[1].encode()).subject
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(not_after - 120, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(not_after, datetime.UTC))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(ca[0], hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_check_leaf_refuses_a_certificate_for_another_key_or_identity() -> None:
    ca = _ca()
    key_pem, csr_pem = new_key_and_csr(SPIFFE)
    pub = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    not_after = int(time.time()) + 60
    leaf = _leaf(ca, pub, SPIFFE, not_after)
    assert check_leaf([leaf], key_pem, SPIFFE) == not_after
    other_key, _ = new_key_and_csr(SPIFFE)
    with pytest.raises(ValueError, match="our key"):
        check_leaf([leaf], other_key, SPIFFE)
    with pytest.raises(ValueError, match="not spiffe"):
        check_leaf([leaf], key_pem, "spiffe://cluster.local/ns/default/sa/other")
    with pytest.raises(ValueError, match="empty"):
        check_leaf([], key_pem, SPIFFE)
    assert split_pem(leaf + "junk\n" + ca[1]) == [leaf.strip() + "\n", ca[1].strip() + "\n"]


def test_chains_to_tells_whether_a_bundle_still_trusts_our_certificate() -> None:
    """After a rotation's old root leaves the bundle, only a certificate it signed needs re-issuing."""
    old, new = _ca(), _ca()
    _, csr_pem = new_key_and_csr(SPIFFE)
    leaf = _leaf(old, x509.load_pem_x509_csr(csr_pem.encode()).public_key(), SPIFFE, time.time() + 60)
    assert chains_to([leaf], [old[1], new[1]]) and chains_to([leaf], [old[1]])
    assert not chains_to([leaf], [new[1]]) and not chains_to([], [old[1]])
    assert chains_to([leaf, old[1]], [old[1]])  # a chain that ends in the root itself


def test_cert_dir_swaps_files_with_modes_and_writes_version_last(tmp_path) -> None:
    d = CertDir(tmp_path, "w1", (os.getuid(), os.getgid()))
    first = CertSet(b"KEY1", ["LEAF1\n"], ["ROOT\n"])
    d.write(first)
    mode = lambda name: stat.S_IMODE((tmp_path / "w1" / name).stat().st_mode)  # noqa: E731
    assert mode("key.pem") == 0o600 and stat.S_IMODE((tmp_path / "w1").stat().st_mode) == 0o700
    assert (tmp_path / "w1" / "version").read_text().strip() == first.version
    second = CertSet(b"KEY1", ["LEAF1\n"], ["ROOT\n", "ROOT2\n"])
    d.write(second, key_too=False)
    assert (tmp_path / "w1" / "root-cert.pem").read_text() == "ROOT\nROOT2\n"
    assert (tmp_path / "w1" / "version").read_text().strip() == second.version != first.version
    assert sorted(p.name for p in (tmp_path / "w1").iterdir()) == [
        "cert-chain.pem", "key.pem", "root-cert.pem", "version"]  # no temp files left behind
    d.remove()
    assert not (tmp_path / "w1").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_cert_dir_hands_the_files_to_the_proxy_user(tmp_path) -> None:
    d = CertDir(tmp_path, "w1", (1337, 1337))
    (tmp_path / "w1").mkdir()
    (tmp_path / "w1" / ".key.pem.tmp").symlink_to("/etc/passwd")  # planted by the directory's owner
    d.write(CertSet(b"KEY", ["LEAF\n"], ["ROOT\n"]))
    for path in [tmp_path / "w1", *(tmp_path / "w1").iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (1337, 1337)
    assert (tmp_path / "w1" / "key.pem").read_bytes() == b"KEY"
    assert not (tmp_path / "w1" / ".key.pem.tmp").exists()
