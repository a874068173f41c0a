"""CSRs, Istio-style plugged-in CA files and the openssl binary, for citadel's tests."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"
DB = f"spiffe://{TD}/ns/prod/sa/db"


def csr_pem(*names: x509.GeneralName | str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
            no_san: bool = False) -> str:
    """A CSR with these SANs (a str is a URI; default: the web identity)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans = [x509.UniformResourceIdentifier(n) if isinstance(n, str) else n for n in names or (WEB,)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
    if not no_san:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def corrupt_signature(pem: str) -> str:
    """The same CSR with one bit of its signature flipped (still well-formed DER)."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA s integer
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def dns(name: str) -> x509.DNSName:
    return x509.DNSName(name)


def ip(addr: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(addr))


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc


def write_chain(directory: Path, reply: dict) -> tuple[Path, Path, Path]:
    """Files for `openssl verify`: root bundle, intermediates (possibly empty), leaf."""
    root, untrusted, leaf = directory / "root.pem", directory / "untrusted.pem", directory / "leaf.pem"
    root.write_text(reply["root"])
    untrusted.write_text("".join(reply["chain"][1:]))
    leaf.write_text(reply["chain"][0])
    return root, untrusted, leaf


def _key(kind: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)


def _ca_cert(subject: str, key, issuer_name: x509.Name, issuer_key, days: int, path_length: int | None
             ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(ski, critical=False))
    if issuer_key is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def istio_cacerts(directory: Path, kind: str = "ec") -> dict[str, x509.Certificate]:
    """What `istioctl`'s Makefile.selfsigned.mk writes: a root and a cluster intermediate."""
    directory.mkdir(parents=True, exist_ok=True)
    root_key, ca_key = _key(kind), _key(kind)
    root = _ca_cert("Root CA", root_key, None, None, 3650, None)
    ca = _ca_cert("Intermediate CA cluster-1", ca_key, root.subject, root_key, 730, 0)
    (directory / "ca-cert.pem").write_bytes(_pem(ca))
    (directory / "ca-key.pem").write_bytes(ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (directory / "root-cert.pem").write_bytes(_pem(root))
    (directory / "cert-chain.pem").write_bytes(_pem(ca) + _pem(root))
    return {"root": root, "ca": ca}


def strict_verify(reply: dict) -> list[x509.GeneralName]:
    """cryptography's RFC 5280 path validation (stricter than openssl's): the leaf's SANs."""
    leaf = x509.load_pem_x509_certificate(reply["chain"][0].encode())
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in reply["chain"][1:]]
    store = Store(x509.load_pem_x509_certificates(reply["root"].encode()))
    verifier = PolicyBuilder().store(store).time(datetime.datetime.now(datetime.UTC)).build_client_verifier()
    return verifier.verify(leaf, chain).subjects
