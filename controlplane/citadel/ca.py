"""Citadel's CA, sans-IO: CSR checks, node authorization, issuance, the trust bundle and root rotation.

Every decision goes through `CertificateAuthority` with the time passed in, so tests drive it
without sockets or sleeping. Each issuance and refusal writes one audit line (component
`citadel`) and counts in the metrics; the RPC shell (service.py) only moves bytes.

Rotation (self-signed root only): `rotate_root` makes a new root, which signs from then on,
and puts it in the bundle beside the old one. The old root leaves the bundle once every identity
that held an unexpired old-root certificate at the start has been re-issued under the new root
or seen that certificate expire (plus `retire_grace_s`, for the new certificates to reach their
proxies).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from bus.logs import Log
from controlplane.citadel.authz import NodeAuthorizer
from controlplane.citadel.identity import Refusal, check_csr
from controlplane.citadel.metrics import ISSUED, REFUSED, ROOT_EXPIRY
from controlplane.citadel.pki import CLOCK_SKEW_S, SigningCa, fingerprint, new_root, pem
from controlplane.citadel.rotation import IssuanceTracker
from controlplane.citadel.store import CaDir
from meshapi.identity import valid_trust_domain

DAY = 86400
DEFAULT_TTL_S = DAY
MAX_TTL_S = 90 * DAY
TRUST_DOMAIN = "cluster.local"
_PRUNE_EVERY_S = 60.0


class RotationError(Exception):
    """A rotation that cannot start; the message says why."""


@dataclass(frozen=True)
class Issued:
    spiffe_id: str
    serial: int
    not_after: int
    ttl_s: int
    chain: list[str]
    roots: list[str]
    note: str = ""

    def reply(self) -> dict[str, Any]:
        body: dict[str, Any] = {"chain": self.chain, "root": "".join(self.roots), "expires": self.not_after,
                                "ttl_s": self.ttl_s, "serial": f"{self.serial:x}",
                                "spiffe_id": self.spiffe_id}
        if self.note:
            body["note"] = self.note
        return body


@dataclass(frozen=True)
class Refused:
    code: str
    detail: str

    def reply(self) -> dict[str, str]:
        return {"refused": self.code, "detail": self.detail}


def _split_denial(denial: str) -> Refused:
    code, sep, detail = denial.partition(": ")
    if not sep or not code.replace("_", "").isalpha() or not code.islower():
        return Refused("not_authorized", denial)  # an authorizer off the convention: keep labels bounded
    return Refused(code, detail)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class CertificateAuthority:
    def __init__(self, signing: SigningCa, authorize: NodeAuthorizer, *, trust_domain: str = TRUST_DOMAIN,
                 default_ttl_s: int = DEFAULT_TTL_S, max_ttl_s: int = MAX_TTL_S,
                 retiring: list[x509.Certificate] | None = None, tracker: IssuanceTracker | None = None,
                 store: CaDir | None = None, retire_grace_s: float = 0.0) -> None:
        if not valid_trust_domain(trust_domain):
            raise ValueError(f"invalid trust domain {trust_domain!r}")
        if not 0 < default_ttl_s <= max_ttl_s:
            raise ValueError(f"need 0 < default TTL ({default_ttl_s}) <= max TTL ({max_ttl_s})")
        self.signing = signing
        self.authorize = authorize
        self.trust_domain = trust_domain
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.retiring = list(retiring or [])
        self.tracker = tracker or IssuanceTracker()
        self.store = store
        self.retire_grace_s = retire_grace_s
        self.issued = 0
        self.refused: Counter[str] = Counter()
        self.log = Log("citadel")
        self._settled_at: float | None = None
        self._pruned_at = 0.0
        self._rebuild_bundle()

    # -- signing --
    def sign(self, node: str, body: Any, now: float) -> Issued | Refused:
        """Answer one request from `node` (the authenticated key name) and audit it."""
        result, spiffe = self._sign(node, body, now)
        if isinstance(result, Refused):
            self.refused[result.code] += 1
            REFUSED.labels(result.code).inc()
            self.log.warning("refused", node=node, spiffe_id=spiffe, reason=result.code, detail=result.detail)
            return result
        self.issued += 1
        ISSUED.inc()
        self.log.info("issued", node=node, spiffe_id=spiffe, serial=f"{result.serial:x}",
                      not_after=_iso(result.not_after), root=self.signing.fingerprint[:16])
        return result

    def _sign(self, node: str, body: Any, now: float) -> tuple[Issued | Refused, str]:
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            return Refused("bad_request", 'the body must be {"csr": PEM string, "ttl_s": seconds}'), ""
        ttl = body.get("ttl_s")
        if ttl is None:
            ttl = self.default_ttl_s
        elif not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            return Refused("bad_request", f"ttl_s must be a positive integer, got {ttl!r}"), ""
        checked = check_csr(body["csr"], self.trust_domain)
        if isinstance(checked, Refusal):
            return Refused(checked.code, checked.detail), ""
        spiffe = str(checked.spiffe)
        if not node:
            return Refused("unknown_node", "the request names no authenticated node (CURVE key)"), spiffe
        denial = self.authorize(node, checked.spiffe.namespace, checked.spiffe.service_account)
        if denial is not None:
            return _split_denial(denial), spiffe
        notes = []
        granted = ttl
        if ttl > self.max_ttl_s:
            granted = self.max_ttl_s
            notes.append(f"ttl_s {ttl} capped to the maximum {self.max_ttl_s}")
        not_after = int(now) + granted
        if not_after > self.signing.expires:
            not_after = int(self.signing.expires)
            granted = not_after - int(now)
            if granted <= 0:
                return Refused("ca_expired", f"the signing CA expired at {_iso(not_after)}"), spiffe
            notes.append(f"expiry capped to the CA certificate's ({_iso(not_after)})")
        serial, leaf = self.signing.issue(checked.spki, spiffe, now - CLOCK_SKEW_S, not_after)
        self.tracker.issued((node, spiffe), self.signing.fingerprint, not_after)
        if self.tracker.rotating and not self.tracker.has_pending:
            self._maybe_retire(now)
        return Issued(spiffe, serial, not_after, granted, [leaf, *self.signing.chain_pems],
                      self._root_pems, "; ".join(notes)), spiffe

    # -- the trust bundle --
    def bundle(self) -> dict[str, Any]:
        """What peers must trust: `ca/bundle` on the bus."""
        return {"roots": list(self._root_pems), "version": self._bundle_version}

    @property
    def bundle_version(self) -> str:
        return self._bundle_version

    def _rebuild_bundle(self) -> None:
        seen: dict[str, str] = {}
        for cert in [*self.signing.roots, *self.retiring]:
            seen.setdefault(fingerprint(cert), pem(cert))
        self._root_pems = list(seen.values())
        self._bundle_version = hashlib.sha256("".join(self._root_pems).encode()).hexdigest()[:16]

    # -- rotation --
    def rotate_root(self, now: float) -> dict[str, Any]:
        """Start a rotation: a new root signs from now on; both are trusted until the old one retires."""
        if self.signing.plugged:
            raise RotationError("the CA is plugged in from cacerts; rotate by replacing those files "
                                "(issued by your root) and restarting citadel")
        if self.tracker.rotating:
            raise RotationError("a rotation is already in progress: "
                                f"{self.tracker.progress(now).as_dict()}")
        cert, key = new_root(self.trust_domain, now)
        new, old = SigningCa(cert, key), self.signing.cert
        total = self.tracker.start(self.signing.fingerprint, new.fingerprint, now)
        if self.store is not None:
            try:
                self.store.begin_rotation(new, old, self.tracker)
            except OSError:
                self.tracker.finish()
                raise
        self.signing, self.retiring = new, [old]
        self._settled_at = None
        self._rebuild_bundle()
        self.log.warning("root rotation started", old=fingerprint(old)[:16], new=new.fingerprint[:16],
                         identities=total)
        self._maybe_retire(now)
        return {"fingerprint": new.fingerprint, "subject": cert.subject.rfc4514_string(),
                "identities": total, "phase": self._phase()}

    def _maybe_retire(self, now: float) -> None:
        if not self.tracker.settled(now):
            self._settled_at = None
            return
        if self._settled_at is None:
            self._settled_at = now
        if now - self._settled_at < self.retire_grace_s:
            return
        progress = self.tracker.progress(now)
        old = self.retiring
        self.retiring = []
        self.tracker.finish()
        self._settled_at = None
        if self.store is not None:
            self.store.finish_rotation()
        self._rebuild_bundle()
        self.log.warning("old root retired", old=",".join(fingerprint(c)[:16] for c in old),
                         reissued=progress.reissued, expired=progress.expired)

    def _phase(self) -> str:
        if not self.tracker.rotating:
            return "idle"
        return "rotating" if self._settled_at is None else "retiring"

    # -- housekeeping --
    def tick(self, now: float) -> None:
        """Once a second: retire a settled old root, forget expired records, save them, export expiry."""
        if self.tracker.rotating:
            self._maybe_retire(now)
        if now - self._pruned_at >= _PRUNE_EVERY_S:
            self._pruned_at = now
            self.tracker.prune(now)
        if self.store is not None and self.tracker.dirty:
            self.store.save_records(self.tracker)
        ROOT_EXPIRY.set(self.signing.expires - now)

    def status(self, now: float) -> dict[str, Any]:
        """For `meshctl ca status`: roots, the rotation's phase and progress, counts."""
        def describe(cert: x509.Certificate, role: str) -> dict[str, str]:
            return {"subject": cert.subject.rfc4514_string(),
                    "not_after": _iso(cert.not_valid_after_utc.timestamp()),
                    "fingerprint": fingerprint(cert), "role": role}
        roots = [describe(c, "trusted" if self.signing.plugged else "signing") for c in self.signing.roots]
        roots += [describe(c, "retiring") for c in self.retiring]
        rotation: dict[str, Any] = {"phase": self._phase()}
        if self.tracker.rotating:
            rotation |= {"started": _iso(self.tracker.started), **self.tracker.progress(now).as_dict()}
        return {"trust_domain": self.trust_domain,
                "mode": "plugged-in" if self.signing.plugged else "self-signed",
                "signing_ca": describe(self.signing.cert, "signing"), "roots": roots,
                "bundle_version": self._bundle_version, "rotation": rotation,
                "issued": self.issued, "refused": dict(self.refused),
                "default_ttl_s": self.default_ttl_s, "max_ttl_s": self.max_ttl_s}
