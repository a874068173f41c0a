"""The CA directory: citadel's own root, kept across restarts, and the state of a root rotation.

Layout (directory 0700, every file 0600):

    root-cert.pem, root-key.pem   the signing root
    rotation.json                 only while a rotation runs: the old root, when it began, the cohort
    issued.json                   latest issuance per identity (saved at most once a second)

A rotation is committed by writing rotation.json after the new root's `*.new` files and before
renaming them into place, so a crash at any point leaves either the old root (no rotation.json:
the `.new` files are dropped) or the rotation (rotation.json present: the renames are redone).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.citadel.pki import CaError, CaKey, SigningCa, fingerprint, new_root, pem
from controlplane.citadel.rotation import IssuanceTracker

ROOT_CERT, ROOT_KEY, ROTATION, ISSUED = "root-cert.pem", "root-key.pem", "rotation.json", "issued.json"


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with a 0600 file holding `data` (fsynced before the rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an older .tmp keeps its mode through O_CREAT
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: CaKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CaDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def load_or_create(self, trust_domain: str, now: float) -> tuple[SigningCa, list[x509.Certificate],
                                                                       IssuanceTracker]:
        """The signing root (created on first start), the retiring root if a rotation runs, and the
        issuance records. Refuses a root key that others can read, as ssh does."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        cert_path, key_path = self.path / ROOT_CERT, self.path / ROOT_KEY
        rotation = self._read_json(ROTATION)
        self._settle_renames(committed=rotation is not None)
        if not cert_path.exists() and not key_path.exists():
            cert, key = new_root(trust_domain, now)
            write_private(key_path, _key_pem(key))
            write_private(cert_path, pem(cert).encode())
        mode = stat.S_IMODE(key_path.stat().st_mode) if key_path.exists() else 0
        if mode & 0o077:
            raise CaError(f"{key_path} is accessible by others (mode {mode:04o}); chmod 600 it")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CaError(f"cannot load the root from {self.path}: {exc}") from None
        if not isinstance(key, CaKey):
            raise CaError(f"{key_path}: {type(key).__name__} is not an ECDSA or RSA key")
        try:
            signing = SigningCa(cert, key)
        except CaError as exc:
            raise CaError(f"{self.path}: {exc}") from None
        tracker = IssuanceTracker()
        retiring: list[x509.Certificate] = []
        try:
            tracker.load_records((self._read_json(ISSUED) or {}).get("records", []))
            if rotation is not None:
                old = x509.load_pem_x509_certificate(rotation["old_root"].encode())
                retiring.append(old)
                tracker.resume(fingerprint(old), signing.fingerprint, float(rotation["started"]),
                               frozenset((str(n), str(s)) for n, s in rotation["cohort"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CaError(f"{self.path}: malformed {ISSUED} or {ROTATION}: {exc!r}") from None
        return signing, retiring, tracker

    def begin_rotation(self, new: SigningCa, old: x509.Certificate, tracker: IssuanceTracker) -> None:
        """Persist the new root and the rotation (the tracker has started it) before anyone sees it."""
        write_private(self.path / (ROOT_KEY + ".new"), _key_pem(new.key))
        write_private(self.path / (ROOT_CERT + ".new"), pem(new.cert).encode())
        body = {"old_root": pem(old), "new_fingerprint": new.fingerprint, "started": tracker.started,
                "cohort": sorted(tracker.cohort)}
        write_private(self.path / ROTATION, json.dumps(body).encode())
        self._settle_renames(committed=True)

    def finish_rotation(self) -> None:
        (self.path / ROTATION).unlink(missing_ok=True)

    def save_records(self, tracker: IssuanceTracker) -> None:
        write_private(self.path / ISSUED, json.dumps({"records": tracker.records_json()}).encode())
        tracker.dirty = False

    def _settle_renames(self, committed: bool) -> None:
        for name in (ROOT_KEY, ROOT_CERT):
            new = self.path / (name + ".new")
            if new.exists():
                if committed:
                    os.replace(new, self.path / name)
                else:
                    new.unlink()

    def _read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CaError(f"cannot read {path}: {exc}") from None
