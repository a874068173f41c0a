"""Citadel's CA without sockets: issuance checked by the real openssl, every refusal, TTLs,
the CA directory, plugged-in cacerts, node authorization and the rotation state machine."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bus.rpc import RpcTimeout
from controlplane.citadel.authz import RegistrationsAuthorizer, StaticAuthorizer, trust_node_agents
from controlplane.citadel.ca import DAY, MAX_TTL_S, CertificateAuthority, Issued, Refused, RotationError
from controlplane.citadel.pki import CaError, SigningCa, fingerprint, load_cacerts, new_root, pem
from controlplane.citadel.store import ROOT_CERT, ROOT_KEY, ROTATION, CaDir
from tests.citadel.helpers import (
    DB,
    TD,
    WEB,
    corrupt_signature,
    csr_pem,
    dns,
    ip,
    istio_cacerts,
    openssl,
    strict_verify,
    write_chain,
)
from tests.conftest import metric

NODES = {"node-1": [("default", "web")], "node-2": [("prod", "db")]}


@pytest.fixture
def audit():
    """The audit lines citadel writes: (message, fields)."""
    lines: list[tuple[str, dict]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    handler = Capture()
    logger = logging.getLogger("zmesh.citadel")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def self_signed(**kw) -> CertificateAuthority:
    cert, key = new_root(TD, time.time())
    return CertificateAuthority(SigningCa(cert, key), StaticAuthorizer(NODES), **kw)


def sign(ca: CertificateAuthority, node: str = "node-1", csr: str | None = None, now: float | None = None,
         **body) -> Issued | Refused:
    return ca.sign(node, {"csr": csr or csr_pem(), **body}, time.time() if now is None else now)


def issued(result: Issued | Refused) -> Issued:
    assert isinstance(result, Issued), result
    return result


def x509_text(pem: str, tmp_path: Path) -> str:
    path = tmp_path / "cert.pem"
    path.write_text(pem)
    return openssl("x509", "-text", "-noout", "-in", str(path)).stdout


# ---- issuance, checked with openssl


def test_a_self_signed_root_issues_a_spiffe_leaf_openssl_accepts(tmp_path, audit) -> None:
    ca = self_signed()
    now = time.time()
    result = issued(sign(ca, now=now))
    reply = result.reply()
    assert reply["chain"] == [reply["chain"][0]]  # the root signs leaves directly
    root, _, leaf = write_chain(tmp_path, reply)
    for purpose in ("sslserver", "sslclient"):
        out = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(root), str(leaf)).stdout
        assert out.strip().endswith(": OK")
    assert strict_verify(reply) == [x509.UniformResourceIdentifier(WEB)]
    text = x509_text(reply["chain"][0], tmp_path)
    assert f"URI:{WEB}" in text and "DNS:" not in text and "IP Address" not in text
    assert "X509v3 Subject Alternative Name: critical" in text
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature, Key Encipherment" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "X509v3 Authority Key Identifier" in text and "X509v3 Subject Key Identifier" in text
    cert = x509.load_pem_x509_certificate(reply["chain"][0].encode())
    assert abs(cert.not_valid_before_utc.timestamp() - (now - 60)) <= 1
    assert cert.not_valid_after_utc.timestamp() == reply["expires"] == int(now) + DAY
    assert f"{cert.serial_number:x}" == reply["serial"] and cert.serial_number.bit_length() > 64
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_cert = x509.load_pem_x509_certificate(reply["root"].encode())
    assert aki.key_identifier == root_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    msg, fields = audit[-1]
    assert msg == "issued" and fields["component"] == "citadel" and fields["node"] == "node-1"
    assert fields["spiffe_id"] == WEB and fields["serial"] == reply["serial"]
    assert fields["not_after"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reply["expires"]))
    assert "PRIVATE KEY" not in json.dumps(reply)


def test_rsa_and_p384_csrs_are_signed_too(tmp_path) -> None:
    ca = self_signed()
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        root, _, leaf = write_chain(tmp_path, issued(sign(ca, csr=csr_pem(key=key))).reply())
        openssl("verify", "-x509_strict", "-CAfile", str(root), str(leaf))


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_plugged_in_istio_cacerts_make_citadel_an_intermediate(tmp_path, kind) -> None:
    made = istio_cacerts(tmp_path / "cacerts", kind)
    signing = load_cacerts(tmp_path / "cacerts")
    assert signing.plugged and signing.roots == (made["root"],)
    ca = CertificateAuthority(signing, StaticAuthorizer(NODES))
    reply = issued(sign(ca)).reply()
    assert len(reply["chain"]) == 2  # leaf, then the intermediate; the root travels as "root"
    assert x509.load_pem_x509_certificate(reply["chain"][1].encode()) == made["ca"]
    assert x509.load_pem_x509_certificate(reply["root"].encode()) == made["root"]
    root, untrusted, leaf = write_chain(tmp_path, reply)
    openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(root), "-untrusted",
            str(untrusted), str(leaf))
    assert strict_verify(reply) == [x509.UniformResourceIdentifier(WEB)]
    alone = openssl("verify", "-CAfile", str(root), str(leaf), check=False)
    assert alone.returncode != 0  # the chain's intermediate is what links the leaf to the root
    assert "Intermediate CA cluster-1" in x509_text(reply["chain"][0], tmp_path)
    assert ca.bundle()["roots"] == [reply["root"]]
    with pytest.raises(RotationError, match="cacerts"):
        ca.rotate_root(time.time())


def test_broken_cacerts_fail_at_start_naming_the_file(tmp_path) -> None:
    istio_cacerts(tmp_path / "a")
    istio_cacerts(tmp_path / "b")
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(CaError, match="does not belong"):
        load_cacerts(tmp_path / "a")
    istio_cacerts(tmp_path / "c")
    (tmp_path / "c" / "root-cert.pem").write_bytes((tmp_path / "b" / "root-cert.pem").read_bytes())
    (tmp_path / "c" / "cert-chain.pem").unlink()
    with pytest.raises(CaError, match=r"root-cert\.pem: no root there issued"):
        load_cacerts(tmp_path / "c")
    with pytest.raises(CaError, match=r"ca-cert\.pem"):
        load_cacerts(tmp_path / "missing")


# ---- refusals


def _two_uris() -> str:
    return csr_pem(WEB, f"spiffe://{TD}/ns/default/sa/other")


GARBAGE_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
REFUSALS = {
    "bad_signature": (lambda: corrupt_signature(csr_pem()), "does not verify"),
    "dns_san": (lambda: csr_pem(WEB, dns("web.default.svc")), "web.default.svc"),
    "ip_san": (lambda: csr_pem(WEB, ip("10.0.0.1")), "10.0.0.1"),
    "multiple_uris": (_two_uris, "got 2"),
    "foreign_trust_domain": (lambda: csr_pem("spiffe://evil.org/ns/default/sa/web"), "'evil.org'"),
    "no_uri_san": (lambda: csr_pem(no_san=True), "no subjectAltName"),
    "other_san": (lambda: csr_pem(WEB, x509.RFC822Name("a@b.c")), "RFC822Name"),
    "unsupported_key": (lambda: csr_pem(key=rsa.generate_private_key(65537, 1024)), "RSA-1024"),
    "malformed_csr": (lambda: GARBAGE_CSR, "not a PEM certificate request"),
}
MALFORMED_IDS = {
    "https://cluster.local/ns/default/sa/web": "not a spiffe:// URI",
    f"spiffe://{TD}/default/web": "/ns/<namespace>/sa/<service-account>",
    f"spiffe://{TD}/ns/default/sa/web/extra": "/ns/<namespace>/sa/<service-account>",
    f"spiffe://{TD}/ns/Default/sa/web": "namespace 'Default'",
    f"spiffe://{TD}/ns/default/sa/": "service account ''",
    f"spiffe://{TD}/ns/default/sa/web%2F..": "service account",
    "spiffe://Cluster.Local/ns/default/sa/web": "trust domain 'Cluster.Local'",
    f"spiffe://user@{TD}/ns/default/sa/web": "trust domain",
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_each_bad_csr_is_refused_with_a_precise_reason(code, audit) -> None:
    make, detail = REFUSALS[code]
    ca = self_signed()
    before = metric("zmesh_citadel_csr_refused_total", reason=code)
    result = sign(ca, csr=make())
    assert isinstance(result, Refused) and result.code == code, result
    assert detail in result.detail
    assert result.reply() == {"refused": code, "detail": result.detail}
    assert metric("zmesh_citadel_csr_refused_total", reason=code) == before + 1
    assert audit[-1][0] == "refused" and audit[-1][1]["reason"] == code and audit[-1][1]["node"] == "node-1"
    assert ca.refused[code] == 1 and ca.issued == 0


@pytest.mark.parametrize("uri", sorted(MALFORMED_IDS))
def test_malformed_spiffe_ids_are_refused(uri) -> None:
    result = sign(self_signed(), csr=csr_pem(uri))
    assert isinstance(result, Refused) and result.code == "malformed_spiffe_id", result
    assert MALFORMED_IDS[uri] in result.detail


def test_a_node_gets_only_its_own_workloads_identities(audit) -> None:
    ca = self_signed()
    issued(sign(ca, "node-2", csr_pem(DB)))
    other = sign(ca, "node-1", csr_pem(DB))  # node-1 asks for node-2's workload identity
    assert isinstance(other, Refused) and other.code == "not_on_node"
    assert "'prod'" in other.detail and "'db'" in other.detail and "'node-1'" in other.detail
    assert audit[-1][1] | {"reason": "not_on_node", "spiffe_id": DB, "node": "node-1"} == audit[-1][1]
    stranger = sign(ca, "node-9")
    assert isinstance(stranger, Refused) and stranger.code == "unknown_node" and "'node-9'" in stranger.detail
    anonymous = sign(ca, "")
    assert isinstance(anonymous, Refused) and anonymous.code == "unknown_node"


def test_trusting_node_agents_allows_any_identity() -> None:
    cert, key = new_root(TD, time.time())
    ca = CertificateAuthority(SigningCa(cert, key), trust_node_agents)
    issued(sign(ca, "anyone", csr_pem(DB)))


@pytest.mark.parametrize("body", [None, "csr", {"csr": 5}, {"ttl_s": 10}, {"csr": "x", "ttl_s": "1h"},
                                  {"csr": "x", "ttl_s": 0}, {"csr": "x", "ttl_s": True}])
def test_a_malformed_body_is_a_bad_request(body) -> None:
    result = self_signed().sign("node-1", body, time.time())
    assert isinstance(result, Refused) and result.code == "bad_request"


# ---- TTLs


def test_ttl_default_request_and_cap() -> None:
    ca = self_signed()
    now = time.time()
    assert issued(sign(ca, now=now)).not_after == int(now) + DAY
    short = issued(sign(ca, now=now, ttl_s=3600))
    assert short.not_after == int(now) + 3600 and "note" not in short.reply()
    long = issued(sign(ca, now=now, ttl_s=365 * DAY)).reply()
    assert long["expires"] == int(now) + MAX_TTL_S and long["ttl_s"] == MAX_TTL_S
    assert long["note"] == f"ttl_s {365 * DAY} capped to the maximum {MAX_TTL_S}"


def test_a_leaf_never_outlives_its_ca() -> None:
    now = time.time()
    cert, key = new_root(TD, now, validity_s=3600)
    ca = CertificateAuthority(SigningCa(cert, key), StaticAuthorizer(NODES))
    reply = issued(sign(ca, now=now)).reply()
    assert reply["expires"] == int(cert.not_valid_after_utc.timestamp()) and "CA certificate" in reply["note"]
    late = sign(ca, now=now + 7200)
    assert isinstance(late, Refused) and late.code == "ca_expired"


def test_bad_ttl_settings_are_refused() -> None:
    cert, key = new_root(TD, time.time())
    with pytest.raises(ValueError, match="default TTL"):
        CertificateAuthority(SigningCa(cert, key), trust_node_agents, default_ttl_s=10 * DAY, max_ttl_s=DAY)
    with pytest.raises(ValueError, match="trust domain"):
        CertificateAuthority(SigningCa(cert, key), trust_node_agents, trust_domain="Bad Domain")


# ---- the CA directory


def test_the_root_is_created_0600_and_reused_after_a_restart(tmp_path) -> None:
    ca_dir = tmp_path / "ca"
    first, retiring, _ = CaDir(ca_dir).load_or_create(TD, time.time())
    assert retiring == [] and not first.plugged
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for name in (ROOT_CERT, ROOT_KEY):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600
    again, _, _ = CaDir(ca_dir).load_or_create(TD, time.time())
    assert again.fingerprint == first.fingerprint
    assert again.key.private_numbers() == first.key.private_numbers()
    cert = first.cert
    assert cert.not_valid_after_utc.timestamp() - time.time() > 9.9 * 365 * DAY
    assert isinstance(first.key, ec.EllipticCurvePrivateKey) and first.key.curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_root_key_readable_by_others_is_refused(tmp_path) -> None:
    CaDir(tmp_path).load_or_create(TD, time.time())
    os.chmod(tmp_path / ROOT_KEY, 0o644)
    with pytest.raises(CaError, match="chmod 600"):
        CaDir(tmp_path).load_or_create(TD, time.time())


def test_records_survive_a_restart(tmp_path) -> None:
    store = CaDir(tmp_path)
    signing, retiring, tracker = store.load_or_create(TD, time.time())
    ca = CertificateAuthority(signing, StaticAuthorizer(NODES), retiring=retiring, tracker=tracker,
                              store=store)
    issued(sign(ca))
    ca.tick(time.time())
    _, _, again = CaDir(tmp_path).load_or_create(TD, time.time())
    assert list(again.records) == [("node-1", WEB)]


# ---- rotation


def rotating_ca(tmp_path: Path, grace: float = 0.0) -> tuple[CertificateAuthority, CaDir]:
    store = CaDir(tmp_path / "ca")
    signing, retiring, tracker = store.load_or_create(TD, time.time())
    ca = CertificateAuthority(signing, StaticAuthorizer(NODES), retiring=retiring, tracker=tracker,
                              store=store, retire_grace_s=grace)
    return ca, store


def test_rotation_trusts_both_roots_until_every_identity_moved(tmp_path, audit) -> None:
    ca, _ = rotating_ca(tmp_path)
    now = time.time()
    web_old = issued(sign(ca, "node-1", csr_pem(WEB), now=now))
    issued(sign(ca, "node-2", csr_pem(DB), now=now))
    old_root = ca.bundle()["roots"]
    started = ca.rotate_root(now)
    assert started["identities"] == 2 and started["phase"] == "rotating"
    assert any(m == "root rotation started" for m, _ in audit)
    roots = ca.bundle()["roots"]
    assert len(roots) == 2 and roots[1] == old_root[0] and roots[0] != old_root[0]
    status = ca.status(now)
    expected = {"phase": "rotating", "total": 2, "reissued": 0, "expired": 0, "pending": 2}
    assert status["rotation"] | expected == status["rotation"]
    assert [r["role"] for r in status["roots"]] == ["signing", "retiring"]
    with pytest.raises(RotationError, match="already in progress"):
        ca.rotate_root(now)
    web_new = issued(sign(ca, "node-1", csr_pem(WEB), now=now + 1))
    assert web_new.roots == roots  # a reply carries every trusted root during the rotation
    # both generations verify against the two-root bundle; the new leaf only against the new root
    for reply in (web_old.reply(), web_new.reply()):
        root, _, leaf = write_chain(tmp_path, reply | {"root": "".join(roots)})
        openssl("verify", "-CAfile", str(root), str(leaf))
    (tmp_path / "new.pem").write_text(roots[0])
    openssl("verify", "-CAfile", str(tmp_path / "new.pem"), str(write_chain(tmp_path, web_new.reply())[2]))
    assert ca.status(now + 1)["rotation"]["reissued"] == 1
    assert len(ca.bundle()["roots"]) == 2
    issued(sign(ca, "node-2", csr_pem(DB), now=now + 2))  # the last identity moves: the old root goes
    assert ca.bundle()["roots"] == [roots[0]]
    assert ca.status(now + 2)["rotation"] == {"phase": "idle"}
    assert audit[-2][0] == "old root retired" and audit[-2][1]["reissued"] == 2


def test_an_expired_old_certificate_counts_as_moved(tmp_path) -> None:
    ca, _ = rotating_ca(tmp_path)
    now = time.time()
    issued(sign(ca, "node-1", csr_pem(WEB), now=now, ttl_s=600))
    issued(sign(ca, "node-2", csr_pem(DB), now=now))
    ca.rotate_root(now)
    issued(sign(ca, "node-2", csr_pem(DB), now=now + 1))
    ca.tick(now + 599)
    assert len(ca.bundle()["roots"]) == 2
    ca.tick(now + 601)  # node-1's old-root certificate has expired: nothing needs the old root
    assert len(ca.bundle()["roots"]) == 1


def test_retirement_waits_for_the_grace_period(tmp_path) -> None:
    ca, _ = rotating_ca(tmp_path, grace=30)
    now = time.time()
    issued(sign(ca, now=now))
    ca.rotate_root(now)
    issued(sign(ca, now=now + 1))
    assert ca.status(now + 1)["rotation"]["phase"] == "retiring"
    ca.tick(now + 20)
    assert len(ca.bundle()["roots"]) == 2
    ca.tick(now + 32)
    assert len(ca.bundle()["roots"]) == 1


def test_a_rotation_with_nothing_issued_retires_the_old_root_at_once(tmp_path) -> None:
    ca, _ = rotating_ca(tmp_path)
    assert ca.rotate_root(time.time())["identities"] == 0
    assert len(ca.bundle()["roots"]) == 1


def test_a_rotation_survives_a_restart(tmp_path) -> None:
    ca, store = rotating_ca(tmp_path)
    now = time.time()
    issued(sign(ca, "node-1", csr_pem(WEB), now=now))
    issued(sign(ca, "node-2", csr_pem(DB), now=now))
    old = ca.signing.fingerprint
    ca.rotate_root(now)
    issued(sign(ca, "node-1", csr_pem(WEB), now=now + 1))
    ca.tick(now + 1)  # saves the records
    new = ca.signing.fingerprint
    restarted, _ = rotating_ca(tmp_path)
    assert restarted.signing.fingerprint == new
    assert [fingerprint(c) for c in restarted.retiring] == [old]
    assert restarted.status(now + 2)["rotation"] | {"reissued": 1, "pending": 1} == \
        restarted.status(now + 2)["rotation"]
    issued(sign(restarted, "node-2", csr_pem(DB), now=now + 2))
    assert len(restarted.bundle()["roots"]) == 1 and not (store.path / ROTATION).exists()


def test_an_interrupted_rotation_commit_rolls_back_or_forward(tmp_path) -> None:
    ca, store = rotating_ca(tmp_path)
    original = ca.signing.fingerprint
    cert, key = new_root(TD, time.time())
    new = SigningCa(cert, key)
    # a crash before the commit point: .new files but no rotation.json -> the old root stays
    (store.path / (ROOT_CERT + ".new")).write_text(pem(cert))
    (store.path / (ROOT_KEY + ".new")).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    again, retiring, _ = CaDir(store.path).load_or_create(TD, time.time())
    assert again.fingerprint == original and retiring == []
    assert not (store.path / (ROOT_CERT + ".new")).exists()
    # a crash between the renames after the commit point -> they are redone
    issued(sign(ca))
    ca.tracker.start(original, new.fingerprint, time.time())
    store.begin_rotation(new, ca.signing.cert, ca.tracker)
    os.replace(store.path / ROOT_CERT, store.path / (ROOT_CERT + ".new"))
    (store.path / ROOT_CERT).write_text(pem(ca.signing.cert))
    resumed, retiring, tracker = CaDir(store.path).load_or_create(TD, time.time())
    assert resumed.fingerprint == new.fingerprint and [fingerprint(c) for c in retiring] == [original]
    assert tracker.rotating and tracker.cohort == {("node-1", WEB)}


# ---- node authorization through pilot


class FakePilot:
    def __init__(self, nodes: dict[str, list[tuple[str, str]]]) -> None:
        self.nodes = nodes
        self.calls = 0
        self.down = False

    def __call__(self, method: str, body: dict) -> list[dict]:
        assert method == "workloads"
        self.calls += 1
        if self.down:
            raise RpcTimeout("workloads: no reply")
        return [{"namespace": ns, "service_account": sa} for ns, sa in self.nodes.get(body["node"], [])]


def test_registrations_authorizer_caches_rechecks_and_fails_fast() -> None:
    clock = [100.0]
    pilot = FakePilot({"node-1": [("default", "web")]})
    authz = RegistrationsAuthorizer(pilot, fresh_s=1.0, recheck_s=0.1, down_s=1.0, clock=lambda: clock[0])
    assert authz("node-1", "default", "web") is None
    assert authz("node-1", "default", "web") is None and pilot.calls == 1  # cached
    assert authz("node-1", "prod", "db").startswith("not_on_node: ") and pilot.calls == 1  # too soon to ask
    pilot.nodes["node-1"].append(("prod", "db"))  # the workload registers
    clock[0] += 0.2
    assert authz("node-1", "prod", "db") is None and pilot.calls == 2
    assert authz("node-7", "default", "web").startswith("unknown_node: ")
    pilot.down = True
    clock[0] += 2
    assert authz("node-1", "default", "web").startswith("authorizer_unavailable: pilot: ")
    calls = pilot.calls
    assert authz("node-1", "default", "web").startswith("authorizer_unavailable")
    assert pilot.calls == calls  # failing fast, not waiting on a dead pilot per request
    pilot.down = False
    clock[0] += 1.1
    assert authz("node-1", "default", "web") is None


def test_an_authorizer_refusal_reaches_the_audit_and_metrics(audit) -> None:
    cert, key = new_root(TD, time.time())
    pilot = FakePilot({})
    pilot.down = True
    ca = CertificateAuthority(SigningCa(cert, key), RegistrationsAuthorizer(pilot))
    result = sign(ca)
    assert isinstance(result, Refused) and result.code == "authorizer_unavailable"
    assert audit[-1][1]["reason"] == "authorizer_unavailable"
    off_convention = CertificateAuthority(SigningCa(cert, key), lambda *_: "Nope, not today")
    result = sign(off_convention)
    assert isinstance(result, Refused) and result.code == "not_authorized"
    assert result.detail == "Nope, not today"
