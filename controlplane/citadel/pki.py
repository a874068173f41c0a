"""X.509 for citadel: a self-signed root, Istio's plugged-in CA files, and workload leaves.

Sans-IO apart from `load_cacerts`, which reads the four files Istio's `cacerts` secret holds.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.citadel.der import integer, spki_key_bits, tlv

ROOT_VALIDITY_S = 10 * 365 * 86400
CLOCK_SKEW_S = 60  # not_before this far back: a peer whose clock is a little behind still accepts

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_LEAF_USAGE = x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                            crl_sign=False, encipher_only=False, decipher_only=False)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")


class CaError(Exception):
    """CA material that is missing, unreadable or inconsistent; the message names the file."""


def utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, as `openssl x509 -fingerprint -sha256` prints it (without colons)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def new_root(trust_domain: str, now: float, validity_s: int = ROOT_VALIDITY_S
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 root. The CN carries the date and a random tag, so two roots
    (before and after a rotation) are told apart in `meshctl ca status` and by openssl."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           f"zmesh root CA {utc(now):%Y-%m-%d} {os.urandom(3).hex()}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(utc(now - CLOCK_SKEW_S)).not_valid_after(utc(now + validity_s))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


class SigningCa:
    """The certificate and key that sign leaves, plus what a verifier needs around them:
    `intermediates`, sent after every leaf (the CA itself up to, not including, the root; empty
    when the CA is the root), and `roots`, the trust anchors (root-cert.pem may hold several)."""

    def __init__(self, cert: x509.Certificate, key: CaKey, intermediates: Sequence[x509.Certificate] = (),
                 roots: Sequence[x509.Certificate] = (), plugged: bool = False) -> None:
        if cert.public_key() != key.public_key():
            raise CaError("the CA key does not belong to the CA certificate")
        self.cert = cert
        self.key = key
        self.intermediates = tuple(intermediates)
        self.roots = tuple(roots) or (cert,)
        self.plugged = plugged  # from Istio's cacerts: rotation belongs to whoever issued them
        self.fingerprint = fingerprint(cert)
        self.chain_pems = [pem(c) for c in self.intermediates]
        top = self.intermediates[-1] if self.intermediates else cert
        path = [cert, *self.intermediates, *[r for r in self.roots if _issued_by(top, r)][:1]]
        self.expires = min(c.not_valid_after_utc for c in path).timestamp()  # a leaf must not outlive it
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(cert))
        self._issuer_der = cert.subject.public_bytes()
        self._sig_alg = _RSA_SHA256 if isinstance(key, rsa.RSAPrivateKey) else _ECDSA_SHA256
        self._ecdsa = ec.ECDSA(hashes.SHA256()) if isinstance(key, ec.EllipticCurvePrivateKey) else None
        self._fixed_extensions = (_extension(19, True, _NOT_CA.public_bytes())
                                  + _extension(15, True, _LEAF_USAGE.public_bytes())
                                  + _extension(37, False, _LEAF_EKU.public_bytes())
                                  + _extension(35, False, aki.public_bytes()))

    def issue(self, spki: bytes, uri: str, not_before: float, not_after: float) -> tuple[int, str]:
        """A workload leaf for the key `spki` (DER), as (serial, PEM): SAN URI only (critical; the subject
        is empty), not a CA, TLS client and server. Built around parts encoded once per CA (der.py)."""
        serial = x509.random_serial_number()
        san = tlv(0x30, tlv(0x86, uri.encode("ascii")))
        ski = tlv(0x04, hashlib.sha1(spki_key_bits(spki)).digest())  # RFC 5280 method 1, as openssl does
        extensions = self._fixed_extensions + _extension(17, True, san) + _extension(14, False, ski)
        tbs = tlv(0x30, b"".join((
            b"\xa0\x03\x02\x01\x02", integer(serial), self._sig_alg, self._issuer_der,
            tlv(0x30, _time(int(not_before)) + _time(int(not_after))), b"\x30\x00", spki,
            tlv(0xA3, tlv(0x30, extensions)))))
        if self._ecdsa is not None:
            signature = self.key.sign(tbs, self._ecdsa)
        else:
            signature = self.key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        b64 = base64.b64encode(tlv(0x30, tbs + self._sig_alg + tlv(0x03, b"\x00" + signature))).decode()
        body = "\n".join([b64[i:i + 64] for i in range(0, len(b64), 64)])
        return serial, f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


@functools.lru_cache(maxsize=16)  # issuance at thousands a second meets the same few seconds
def _time(ts: int) -> bytes:
    """RFC 5280: UTCTime through 2049, GeneralizedTime from 2050."""
    t = time.gmtime(ts)
    if t.tm_year < 2050:
        return tlv(0x17, time.strftime("%y%m%d%H%M%SZ", t).encode())
    return tlv(0x18, time.strftime("%Y%m%d%H%M%SZ", t).encode())


def _extension(oid_last: int, critical: bool, value: bytes) -> bytes:
    """An extension under id-ce (2.5.29.n), which holds every one a leaf carries."""
    return tlv(0x30, bytes((0x06, 0x03, 0x55, 0x1D, oid_last)) + (b"\x01\x01\xff" if critical else b"")
               + tlv(0x04, value))


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CaError(f"cannot read certificates from {path}: {exc}") from None


def load_cacerts(directory: str | os.PathLike) -> SigningCa:
    """Istio's plugged-in CA: ca-cert.pem + ca-key.pem sign, cert-chain.pem is the chain from
    ca-cert to the root (ca-cert first, as Istio writes it; optional), root-cert.pem the roots.
    Every link is checked here, so a wrong file fails at start, not in every workload's handshake."""
    d = Path(directory)
    ca_cert = _read_certs(d / "ca-cert.pem")[0]
    try:
        key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CaError(f"cannot read the CA key {d / 'ca-key.pem'}: {exc}") from None
    if not isinstance(key, CaKey):
        raise CaError(f"{d / 'ca-key.pem'}: {type(key).__name__} is not an ECDSA or RSA key")
    roots = _read_certs(d / "root-cert.pem")
    chain_file = d / "cert-chain.pem"
    chain = [c for c in _read_certs(chain_file) if not is_self_signed(c)] if chain_file.exists() else []
    if is_self_signed(ca_cert):
        chain = []
    elif not chain or chain[0] != ca_cert:
        chain.insert(0, ca_cert)
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{d / 'ca-cert.pem'} is not a CA certificate (basicConstraints CA:TRUE)")
    for child, parent in itertools.pairwise(chain):
        if not _issued_by(child, parent):
            raise CaError(f"{chain_file}: {child.subject.rfc4514_string()} is not issued by "
                          f"{parent.subject.rfc4514_string()}")
    top = chain[-1] if chain else ca_cert
    if not any(_issued_by(top, root) for root in roots):
        raise CaError(f"{d / 'root-cert.pem'}: no root there issued {top.subject.rfc4514_string()}")
    try:
        return SigningCa(ca_cert, key, chain, roots, plugged=True)
    except CaError as exc:
        raise CaError(f"{d}: {exc}") from None
