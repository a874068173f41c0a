"""What a CSR may ask for: one SPIFFE id `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` and nothing else.

Sans-IO. Every refusal carries a stable `code` (a metric label and what a node agent can act on)
and a `detail` that names the offending value, so an operator can fix the request without
reading citadel's source.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.citadel.der import request_spki
from meshapi.identity import SpiffeId, SpiffeIdError, parse_spiffe_id

MAX_CSR_BYTES = 16 * 1024  # a P-384 or RSA-4096 CSR with one URI is ~2 KiB
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Refusal:
    code: str
    detail: str


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR whose signature, key and identity passed every check."""
    spki: bytes  # the public key as DER SubjectPublicKeyInfo, as the certificate will carry it
    spiffe: SpiffeId


def parse_spiffe(uri: str, trust_domain: str) -> SpiffeId | Refusal:
    """A well-formed workload id (meshapi.identity) in the trust domain this CA signs for."""
    try:
        spiffe = parse_spiffe_id(uri)
    except SpiffeIdError as exc:
        return Refusal("malformed_spiffe_id", str(exc))
    if spiffe.trust_domain != trust_domain:
        return Refusal("foreign_trust_domain", f"{uri!r} is in trust domain {spiffe.trust_domain!r}; "
                       f"this CA signs only for {trust_domain!r}")
    return spiffe


def check_csr(pem: str, trust_domain: str) -> CheckedCsr | Refusal:
    """Parse, check the key, verify the self-signature (proof that the requester holds the key),
    and accept exactly one SAN: a URI naming a workload in `trust_domain`. The subject and any
    requested extensions are ignored: citadel writes every field of the certificate itself."""
    if not isinstance(pem, str) or len(pem) > MAX_CSR_BYTES:
        return Refusal("malformed_csr", f"csr must be a PEM string of at most {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        info = csr.tbs_certrequest_bytes
        spki = request_spki(info)
        key = serialization.load_der_public_key(spki)  # csr.public_key() costs OpenSSL a second import
    except (ValueError, IndexError, UnsupportedAlgorithm) as exc:
        return Refusal("malformed_csr", f"not a PEM certificate request with a readable key: {exc}")
    refusal = _check_key(key)
    if refusal is not None:
        return refusal
    try:
        params = csr.signature_algorithm_parameters
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(csr.signature, info, params)
        else:
            key.verify(csr.signature, info, params, csr.signature_hash_algorithm)
    except InvalidSignature:
        return Refusal("bad_signature", "the CSR's signature does not verify with its own public key")
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return Refusal("malformed_csr", f"unsupported CSR signature: {exc}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Refusal("no_uri_san", "the CSR has no subjectAltName; it needs one URI "
                       f"spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>")
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        return Refusal("malformed_csr", f"unreadable CSR extensions: {exc}")
    dns, ips = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)
    if dns:
        return Refusal("dns_san", f"DNS SANs are not allowed (got {', '.join(dns)}); "
                       "workload certificates carry only a SPIFFE URI")
    if ips:
        return Refusal("ip_san", f"IP SANs are not allowed (got {', '.join(map(str, ips))}); "
                       "workload certificates carry only a SPIFFE URI")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        return Refusal("other_san", f"only a URI SAN is allowed, got {type(others[0]).__name__}")
    if not uris:
        return Refusal("no_uri_san", "the subjectAltName holds no URI")
    if len(uris) > 1:
        return Refusal("multiple_uris", f"exactly one URI SAN is allowed, got {len(uris)}: {', '.join(uris)}")
    spiffe = parse_spiffe(uris[0], trust_domain)
    if isinstance(spiffe, Refusal):
        return spiffe
    return CheckedCsr(spki, spiffe)


def _check_key(key: object) -> Refusal | None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _EC_CURVES):
            return None
        return Refusal("unsupported_key", f"EC curve {key.curve.name} is not allowed (P-256 or P-384)")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= _MIN_RSA_BITS:
            return None
        return Refusal("unsupported_key", f"RSA-{key.key_size} is too weak (at least {_MIN_RSA_BITS} bits)")
    return Refusal("unsupported_key", f"{type(key).__name__} keys are not allowed (ECDSA P-256/P-384 or RSA)")
