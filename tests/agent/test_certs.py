"""Readiness includes the workload certificates: the checker alone, then the agent with `--certs`."""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dataplane.agent.agent import proxy_takes_certs
from dataplane.agent.certs import cert_problem
from tests.agent.test_agent import _cleanup, meshctl, status
from tests.conftest import free_port, wait_for
from tests.proxy.test_sidecar import http_get, tcp_config, try_get

DAY = datetime.timedelta(days=1)
SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/pod"


def pem_cert(key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime,
             not_after: datetime.datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zmesh test")])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)])  # the proxy needs it
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before)
            .not_valid_after(not_after).add_extension(san, critical=False).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def write_certs(directory: Path, *, expired: bool = False) -> None:
    """What the node agent writes: key.pem, cert-chain.pem, root-cert.pem, then version."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = pem_cert(key, now - 2 * DAY, now - DAY) if expired else pem_cert(key, now - DAY, now + DAY)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "cert-chain.pem").write_bytes(leaf)
    (directory / "root-cert.pem").write_bytes(pem_cert(key, now - DAY, now + 10 * DAY))
    (directory / "version").write_text(str(time.time_ns()))  # a new set, a new version


def test_cert_problem_names_what_is_wrong(tmp_path: Path) -> None:
    certs = tmp_path / "certs" / "pod-1"
    assert "No such file or directory" in (cert_problem(certs) or "")
    write_certs(certs)
    assert cert_problem(certs) is None
    assert "cert-chain.pem expired" in (cert_problem(certs, now=time.time() + 2 * 86400) or "")
    assert "not valid before" in (cert_problem(certs, now=time.time() - 2 * 86400) or "")
    write_certs(certs, expired=True)
    assert "cert-chain.pem expired" in (cert_problem(certs) or "")
    write_certs(certs)
    (certs / "root-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert "root-cert.pem is not a PEM certificate" in (cert_problem(certs) or "")
    write_certs(certs)
    (certs / "key.pem").write_text("not a key")
    assert "key.pem is not a private key" in (cert_problem(certs) or "")


def test_the_agent_is_ready_only_with_valid_certificates(tmp_path: Path) -> None:
    health, metrics, admin, stats, port = (free_port() for _ in range(5))
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(tcp_config("v1", port, free_port())))
    certs = tmp_path / "certs" / "pod-1"
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [*meshctl("agent"), "--health-port", str(health), "--metrics-port", str(metrics),
             "--proxy-admin-port", str(admin), "--proxy-stats-port", str(stats), "--certs", str(certs),
             "--termination-drain-duration", "0.5",
             "--", "--id", "pod-1", "--config", str(config), "--mode", "explicit", "--workers", "1",
             "--no-access-log"], stderr=log)
    ready_url = f"http://127.0.0.1:{health}/healthz/ready"
    try:
        # the proxy has its config, the certificates are not there yet
        proxy_ready = f"http://127.0.0.1:{admin}/ready"
        assert wait_for(lambda: try_get(proxy_ready) == (503, "NO CERTIFICATES\n"), 15), log_path.read_text()
        code, body = http_get(ready_url)
        assert code == 503 and "certificates not ready" in body and "key.pem" in body, body
        write_certs(certs, expired=True)
        code, body = http_get(ready_url)
        assert code == 503 and "cert-chain.pem expired" in body, body
        write_certs(certs)
        assert wait_for(lambda: status(ready_url) == 200, 5), http_get(ready_url)

        # --certs reaches the proxy only when the proxy takes it
        proxy = psutil.Process(agent.pid).children()[0].cmdline()
        assert ("--certs" in proxy) == proxy_takes_certs()
        if proxy_takes_certs():
            assert proxy[proxy.index("--certs") + 1] == str(certs)
    finally:
        _cleanup(agent)
