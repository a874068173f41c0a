"""Workload identity as every plane spells it: the SPIFFE id and the certificate directory.

Citadel signs `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the node agent asks
for it and writes the files a proxy reads, pilot names it in endpoints for clients to verify, and
the proxy checks it: one format, one parser, one directory layout. Sans-IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SCHEME = "spiffe://"
PROXY_UID = 1337  # Istio's proxy user: iptables exempts its traffic, the node agent gives it the files
# the node agent writes, the proxy and pilot-agent read: <run-dir>/certs/<workload-id>/<file>
CERTS_DIR = "certs"
KEY_FILE, CHAIN_FILE, ROOT_FILE, VERSION_FILE = "key.pem", "cert-chain.pem", "root-cert.pem", "version"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class SpiffeIdError(ValueError):
    """Not Istio's workload id form; the message names the offending part."""


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.service_account)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def valid_trust_domain(name: str) -> bool:
    """SPIFFE's trust-domain rule: lowercase letters, digits, '.', '-', '_'."""
    return bool(_TRUST_DOMAIN.fullmatch(name))


def valid_namespace(name: str) -> bool:
    """A Kubernetes namespace: a DNS-1123 label."""
    return len(name) <= 63 and bool(_DNS_LABEL.fullmatch(name))


def valid_service_account(name: str) -> bool:
    """A Kubernetes service account: a DNS-1123 subdomain."""
    return len(name) <= 253 and all(_DNS_LABEL.fullmatch(p) for p in name.split("."))


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Istio's workload id form only (anything looser could alias another identity); raises
    SpiffeIdError."""
    if not uri.startswith(SCHEME):
        raise SpiffeIdError(f"{uri!r} is not a spiffe:// URI")
    domain, _, path = uri[len(SCHEME):].partition("/")
    if not valid_trust_domain(domain):
        raise SpiffeIdError(f"{uri!r}: trust domain {domain!r} is not a valid SPIFFE trust domain "
                            "(lowercase letters, digits, '.', '-', '_')")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise SpiffeIdError(f"{uri!r}: the path must be /ns/<namespace>/sa/<service-account>")
    namespace, account = parts[1], parts[3]
    if not valid_namespace(namespace):
        raise SpiffeIdError(f"{uri!r}: namespace {namespace!r} is not a DNS-1123 label")
    if not valid_service_account(account):
        raise SpiffeIdError(f"{uri!r}: service account {account!r} is not a DNS-1123 subdomain")
    return SpiffeId(domain, namespace, account)


def cert_dir(run_dir: Path, workload_id: str) -> Path:
    """Where the node agent under `run_dir` keeps a workload's key, chain, roots and version."""
    return run_dir / CERTS_DIR / workload_id
