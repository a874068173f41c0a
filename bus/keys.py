"""The mesh keyring: a directory of CURVE and Ed25519 keys, one pair of each per component.

Layout (`meshctl bus keygen` writes it):

    NAME.key          CURVE public key (ZeroMQ certificate format)
    NAME.key_secret   CURVE secret key, 0600
    NAME.sign         Ed25519 private key (PEM), 0600
    NAME.sign.pub     Ed25519 public key (PEM)

Every `*.key` in the directory is on the ZAP allow-list, and every `*.sign.pub`
names a trusted signing origin. A host gets its own secrets plus everyone's publics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


class KeyringError(Exception):
    """A key that is missing or unreadable; the message names the file."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def generate(directory: str | os.PathLike, name: str, overwrite: bool = False) -> list[Path]:
    """Write a CURVE pair and an Ed25519 pair for `name`; returns the files written."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = [d / f"{name}.key", d / f"{name}.key_secret", d / f"{name}.sign", d / f"{name}.sign.pub"]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (use --force to replace)")
    public, secret = zmq.curve_keypair()
    files[0].write_text(_zcert(public, None))
    _write_private(files[1], _zcert(public, secret).encode())
    key = Ed25519PrivateKey.generate()
    _write_private(files[2], key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files[3].write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return files


def _zcert(public: bytes, secret: bytes | None) -> str:
    lines = ["#   ZeroMQ CURVE certificate written by meshctl bus keygen", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes


class Keyring:
    """One component's view of the key directory: its own secrets and everyone's publics."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.directory = Path(directory)
        self.name = name

    def curve(self) -> CurveKeys:
        path = self.directory / f"{self.name}.key_secret"
        try:
            public, secret = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            raise KeyringError(f"cannot load CURVE secret {path}: {exc}") from None
        if not secret:
            raise KeyringError(f"{path} holds no secret key")
        return CurveKeys(public, secret)

    def curve_public(self, name: str) -> bytes:
        path = self.directory / f"{name}.key"
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            raise KeyringError(f"cannot load CURVE public key {path}: {exc}") from None
        return public

    def signing_key(self) -> Ed25519PrivateKey:
        path = self.directory / f"{self.name}.sign"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise KeyringError(f"cannot load signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyringError(f"{path} is not an Ed25519 key")
        return key

    def allowed_clients(self) -> dict[bytes, str]:
        """Z85 CURVE public key -> component name, for the ZAP allow-list."""
        return load_allowed_clients(self.directory)

    def trusted_signers(self) -> dict[str, Ed25519PublicKey]:
        return load_trusted_signers(self.directory)


def load_allowed_clients(directory: str | os.PathLike) -> dict[bytes, str]:
    allowed: dict[bytes, str] = {}
    for path in sorted(Path(directory).glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError):
            continue  # a half-written file is picked up on the next reload
        allowed[public] = path.name[: -len(".key")]
    return allowed


def load_trusted_signers(directory: str | os.PathLike) -> dict[str, Ed25519PublicKey]:
    trusted: dict[str, Ed25519PublicKey] = {}
    for path in sorted(Path(directory).glob("*.sign.pub")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(key, Ed25519PublicKey):
            trusted[path.name[: -len(".sign.pub")]] = key
    return trusted
