"""Readiness of the workload's certificate files (the node agent's `<run-dir>/certs/<id>/`).

A sidecar that takes traffic before its certificate is on disk, or after it expired, fails every
mTLS handshake: so the agent reports not ready until the files are there and valid.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshapi.identity import CHAIN_FILE, KEY_FILE, ROOT_FILE


def _validity(pem: bytes, what: str, now: datetime) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        return f"{what} is not a PEM certificate: {exc}"
    if now < cert.not_valid_before_utc:
        return f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}"
    if now >= cert.not_valid_after_utc:
        return f"{what} expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def cert_problem(directory: Path, now: float | None = None) -> str | None:
    """None when key.pem, cert-chain.pem (its leaf) and root-cert.pem exist, parse and are within
    their validity at `now` (Unix seconds; default: the clock); else why not."""
    at = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    try:
        key, chain, root = (
            (directory / name).read_bytes() for name in (KEY_FILE, CHAIN_FILE, ROOT_FILE))
    except OSError as exc:
        return f"certificates not ready: {exc.strerror}: {exc.filename}"
    try:
        serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        return f"certificates not ready: {KEY_FILE} is not a private key: {exc}"
    for pem, what in ((chain, CHAIN_FILE), (root, ROOT_FILE)):
        if (reason := _validity(pem, what, at)) is not None:
            return f"certificates not ready: {reason}"
    return None
