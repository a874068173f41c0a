"""Workload keys, CSRs and the certificate files a proxy reads.

The private key is made here, in memory, and leaves this process only as the proxy's
key.pem: citadel sees the CSR. Files are swapped in atomically (temp file in the same
directory + rename); `version` is removed first and written last, so a reader that sees
the same version before and after reading the other files has a consistent set (one that
finds no `version` is early: the set is being written). Without the removal, a reader that
started just before a write would see the old version twice around a new key and old chain.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshapi.identity import CHAIN_FILE, KEY_FILE, PROXY_UID, ROOT_FILE, VERSION_FILE

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----")


def new_key_and_csr(spiffe: str) -> tuple[bytes, str]:
    """A fresh P-256 key (PKCS#8 PEM, kept by the caller) and a CSR whose only SAN is `spiffe`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def split_pem(text: str) -> list[str]:
    """Each certificate of a PEM bundle, normalised (one trailing newline)."""
    return [m.group(0).strip() + "\n" for m in _PEM_CERT.finditer(text)]


def check_leaf(chain: list[str], key_pem: bytes, spiffe: str) -> float:
    """Check that the leaf is for our key and identity; returns its expiry (Unix seconds).
    Raises ValueError: a mixed-up answer must never replace working certificates."""
    if not chain:
        raise ValueError("empty certificate chain")
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
            != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ValueError("the certificate is not for our key")
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [spiffe]:
        raise ValueError(f"the certificate names {uris}, not {spiffe}")
    return leaf.not_valid_after_utc.timestamp()


def chains_to(chain: list[str], roots: list[str]) -> bool:
    """Whether the chain's top certificate is one of `roots` or signed by one."""
    if not chain:
        return False
    top = x509.load_pem_x509_certificate(chain[-1].encode())
    for root_pem in roots:
        root = x509.load_pem_x509_certificate(root_pem.encode())
        if top == root:
            return True
        try:
            top.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def default_owner() -> tuple[int, int]:
    """The proxy's uid/gid when that user exists (the files are for it), else our own."""
    try:
        entry = pwd.getpwuid(PROXY_UID)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return os.getuid(), os.getgid()


@dataclass(frozen=True)
class CertSet:
    key_pem: bytes
    chain: list[str]
    roots: list[str]

    @property
    def version(self) -> str:
        """Changes with any file's content."""
        h = hashlib.sha256()
        for part in (*self.chain, "--", *self.roots):
            h.update(part.encode())
        return h.hexdigest()[:16]


class CertDir:
    """`<run-dir>/certs/<workload-id>/`, owned by the proxy's uid/gid."""

    def __init__(self, root: Path, workload_id: str, owner: tuple[int, int]) -> None:
        self.path = root / workload_id
        self.owner = owner

    def write(self, certs: CertSet, key_too: bool = True) -> None:
        """Swap the files in; `key_too=False` (a new trust bundle) leaves key and chain as they are."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own(self.path, 0o700)
        (self.path / VERSION_FILE).unlink(missing_ok=True)  # readers now know a write is under way
        if key_too:
            self._replace(KEY_FILE, certs.key_pem, 0o600)
            self._replace(CHAIN_FILE, "".join(certs.chain).encode(), 0o644)
        self._replace(ROOT_FILE, "".join(certs.roots).encode(), 0o644)
        self._replace(VERSION_FILE, (certs.version + "\n").encode(), 0o644)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _own(self, path: Path, mode: int) -> None:
        if (os.getuid(), os.getgid()) != self.owner:
            os.chown(path, *self.owner, follow_symlinks=False)
        os.chmod(path, mode)

    def _replace(self, name: str, data: bytes, mode: int) -> None:
        # The directory belongs to the proxy's user: never follow or reuse what it may have put there.
        tmp = self.path / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if (os.getuid(), os.getgid()) != self.owner:
                    os.fchown(f.fileno(), *self.owner)
                os.fchmod(f.fileno(), mode)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
