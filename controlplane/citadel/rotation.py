"""Which identities still hold a certificate from the old root, so a rotation knows when it may
drop that root from the trust bundle.

Sans-IO. An identity here is (node, SPIFFE id): replicas of one service account on one node share
their node agent's certificate, replicas on different nodes do not, and each must move to the new
root before the old one can go. Only the latest issuance per identity is kept: a node agent uses
its newest certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Identity = tuple[str, str]  # (node, spiffe id)


@dataclass(frozen=True)
class Progress:
    total: int      # identities holding an unexpired old-root certificate when the rotation began
    reissued: int   # of those, re-issued under the new root since
    expired: int    # of the rest, whose old certificate has expired
    pending: int

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "reissued": self.reissued, "expired": self.expired,
                "pending": self.pending}


class IssuanceTracker:
    """Latest (root fingerprint, not_after) per identity, and the rotation cohort if one runs."""

    def __init__(self) -> None:
        self.records: dict[Identity, tuple[str, float]] = {}
        self.cohort: frozenset[Identity] = frozenset()
        self.old_root = ""
        self.new_root = ""
        self.started = 0.0
        self._pending: set[Identity] = set()
        self.dirty = False  # records changed since the store last saved them

    @property
    def rotating(self) -> bool:
        return bool(self.old_root)

    def issued(self, identity: Identity, root: str, not_after: float) -> None:
        self.records[identity] = (root, not_after)
        self.dirty = True
        if root == self.new_root:
            self._pending.discard(identity)

    def start(self, old_root: str, new_root: str, now: float) -> int:
        """Begin a rotation; returns how many identities must move (or let their cert expire)."""
        if self.rotating:
            raise ValueError("a rotation is already in progress")
        cohort = frozenset(i for i, (root, not_after) in self.records.items()
                           if root == old_root and not_after > now)
        self.resume(old_root, new_root, now, cohort)
        return len(cohort)

    def resume(self, old_root: str, new_root: str, started: float, cohort: frozenset[Identity]) -> None:
        """Take up a rotation (after a restart, from what the store kept)."""
        self.old_root, self.new_root, self.started, self.cohort = old_root, new_root, started, cohort
        self._pending = {i for i in cohort if self.records.get(i, (new_root, 0.0))[0] != new_root}

    @property
    def has_pending(self) -> bool:
        """Cheap: False means settled, True may still be settled by expiry (see `settled`)."""
        return bool(self._pending)

    def settled(self, now: float) -> bool:
        """True once every cohort identity was re-issued under the new root or its old cert expired."""
        self._pending = {i for i in self._pending if self.records.get(i, ("", 0.0))[1] > now}
        return not self._pending

    def finish(self) -> None:
        self.old_root = self.new_root = ""
        self.started = 0.0
        self.cohort = frozenset()
        self._pending = set()

    def progress(self, now: float) -> Progress:
        reissued = expired = 0
        for identity in self.cohort:
            root, not_after = self.records.get(identity, ("", 0.0))
            if root == self.new_root:
                reissued += 1
            elif not_after <= now:
                expired += 1
        return Progress(len(self.cohort), reissued, expired, len(self.cohort) - reissued - expired)

    def prune(self, now: float) -> None:
        """Forget identities whose latest certificate has expired (they are nobody's concern)."""
        gone = [i for i, (_, not_after) in self.records.items() if not_after <= now]
        for identity in gone:
            del self.records[identity]
        self.dirty = self.dirty or bool(gone)

    def records_json(self) -> list[list[Any]]:
        return [[node, spiffe, root, not_after] for (node, spiffe), (root, not_after) in self.records.items()]

    def load_records(self, rows: list[list[Any]]) -> None:
        self.records = {(str(node), str(spiffe)): (str(root), float(not_after))
                        for node, spiffe, root, not_after in rows}
