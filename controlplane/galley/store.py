"""Galley's config store: the last valid version of every source unit, merged into a snapshot.

Sans-IO. A *unit* is what a source changes atomically: one file of the watched
directory, or one etcd key. A unit that becomes invalid keeps its last valid
resources in force and records its errors, so a bad save never takes config away.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from controlplane.config.analyze import first_definitions
from controlplane.config.diagnostics import ERROR, Diagnostic
from controlplane.config.model import Key, Resource
from controlplane.config.validate import load_text

# What a refused definition of a resource already defined (ZM0002) means here and in `meshctl apply`.
REFUSED = "refused"


@dataclass
class Unit:
    resources: dict[Key, Resource] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    rejected: bool = False  # the latest text was invalid; `resources` are from an older one


@dataclass(frozen=True)
class Change:
    """What one update did to the merged snapshot."""

    upserted: tuple[Key, ...] = ()
    removed: tuple[Key, ...] = ()
    rejected: bool = False

    def __bool__(self) -> bool:
        return bool(self.upserted or self.removed)


class ConfigStore:
    def __init__(self) -> None:
        self.units: dict[str, Unit] = {}
        self.snapshot: dict[Key, Resource] = {}
        self._owner: dict[Key, str] = {}
        self._digest = 0  # sum of per-resource digests: an O(1) content-hash version

    def update(self, unit: str, text: str) -> Change:
        """Apply a unit's new text; an invalid text is rejected and its old resources stay."""
        result = load_text(text, unit)
        elsewhere = {r.key: self.snapshot[r.key] for r in result.resources
                     if self._owner.get(r.key, unit) != unit}
        unique, duplicates = first_definitions(result.resources, elsewhere, REFUSED)
        diagnostics = result.diagnostics + duplicates
        fresh = {r.key: r for r in unique}
        old = self.units.get(unit, Unit())
        if any(d.level == ERROR for d in diagnostics):
            self.units[unit] = Unit(old.resources, diagnostics, True)
            return Change(rejected=True)
        self.units[unit] = Unit(fresh, diagnostics, False)
        return self._merge(unit, old.resources, fresh)

    def remove(self, unit: str) -> Change:
        old = self.units.pop(unit, None)
        if old is None:
            return Change()
        return self._merge(unit, old.resources, {})

    def _merge(self, unit: str, old: dict[Key, Resource], new: dict[Key, Resource]) -> Change:
        removed = tuple(sorted(k for k in old if k not in new))
        for key in removed:
            self._digest -= _digest(key, self.snapshot.pop(key))
            self._owner.pop(key, None)
        upserted = []
        for key, r in new.items():
            prev = self.snapshot.get(key)
            if prev is not None:
                self._digest -= _digest(key, prev)
            if prev is None or prev.content_hash != r.content_hash:
                upserted.append(key)
            self._digest += _digest(key, r)
            self.snapshot[key] = r
            self._owner[key] = unit
        return Change(tuple(sorted(upserted)), removed)

    def diagnostics(self) -> list[Diagnostic]:
        return sorted(d for u in self.units.values() for d in u.diagnostics)

    def rejected_units(self) -> list[str]:
        return sorted(name for name, u in self.units.items() if u.rejected)

    def version(self) -> str:
        """A content hash of the whole snapshot: equal config, equal version. Kept as a sum of
        per-resource digests, so a change costs O(1) however many resources are in force."""
        return f"{self._digest % (1 << 64):016x}"


def _digest(key: Key, r: Resource) -> int:
    h = hashlib.blake2b(f"{key.kind}/{key.namespace}/{key.name}={r.content_hash}".encode(), digest_size=16)
    return int.from_bytes(h.digest(), "big")
