"""Galley: validated config from a source, published on the bus keyed per resource.

Changes are debounced: a burst of edits becomes one publish once the source has been
quiet for `debounce` seconds (never later than `max_delay` after the burst began).
Only valid config is ever published; the store keeps a broken unit's last valid
version in force and galley reports the errors (log, metrics, `galley/_status`).
"""

from __future__ import annotations

import time
from typing import Any

from bus.logs import Log
from bus.loop import Loop
from bus.pubsub import Publisher
from controlplane.config.model import Key
from controlplane.debounce import DebouncedCall, Debouncer
from controlplane.galley.metrics import (
    PUBLISH_DELAY,
    PUBLISHED_CHANGES,
    PUBLISHES,
    REJECTED_UNITS,
    REJECTIONS,
    RESOURCES,
    VALIDATION_ERRORS,
)
from controlplane.galley.store import ConfigStore

STATUS_KEY = "galley/_status"


def topic(key: Key) -> str:
    return f"galley/{key.kind}/{key.namespace or '_'}/{key.name}"


class Galley:
    def __init__(self, loop: Loop, publisher: Publisher, debounce: float = 0.02,
                 max_delay: float = 0.5) -> None:
        self.loop = loop
        self.publisher = publisher
        self.store = ConfigStore()
        self.debounce = Debouncer(debounce, max_delay)
        self._publish_call = DebouncedCall(loop, self.debounce, self.publish)
        self.log = Log("galley")
        self._dirty: set[Key] = set()
        self._status_dirty = False
        self.published_version = ""
        self.publishes = 0

    def on_unit(self, unit: str, text: str | None) -> None:
        """A source's report that `unit` changed (text) or disappeared (None)."""
        change = self.store.update(unit, text) if text is not None else self.store.remove(unit)
        if change.rejected:
            errors = [d for d in self.store.units[unit].diagnostics if d.level == "Error"]
            REJECTIONS.labels(errors[0].name).inc()
            for d in errors:
                VALIDATION_ERRORS.labels(d.code).inc()
                self.log.error("invalid config; last valid version stays in force", unit=unit,
                               diagnostic=str(d))
        elif change:
            self.log.info("config changed", unit=unit, upserted=len(change.upserted),
                          removed=len(change.removed))
        self._dirty.update(change.upserted)
        self._dirty.update(change.removed)
        self._status_dirty = True
        self._publish_call.change()

    def publish(self) -> None:
        if self.debounce.started is not None:
            PUBLISH_DELAY.observe(time.monotonic() - self.debounce.started)
        self.debounce.fire()
        version = self.store.version()
        # set before sending: a subscriber may see the update before this thread runs on
        self.published_version = version
        dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            resource = self.store.snapshot.get(key)
            if resource is None:
                self.publisher.delete(topic(key))
                PUBLISHED_CHANGES.labels("delete").inc()
            else:
                self.publisher.set(topic(key), resource.normalized(), config_version=version)
                PUBLISHED_CHANGES.labels("upsert").inc()
        if self._status_dirty or dirty:
            self.publisher.set(STATUS_KEY, self.status(), config_version=version)
            self._status_dirty = False
        self.publishes += 1
        PUBLISHES.inc()
        self._update_gauges()

    def status(self) -> dict[str, Any]:
        return {"version": self.store.version(), "resources": len(self.store.snapshot),
                "rejected": self.store.rejected_units(),
                "diagnostics": [d.to_dict() for d in self.store.diagnostics()]}

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for key in self.store.snapshot:
            counts[key.kind] = counts.get(key.kind, 0) + 1
        for kind in list(RESOURCES._metrics):  # kinds that vanished go to zero
            RESOURCES.labels(*kind).set(0)
        for kind, n in counts.items():
            RESOURCES.labels(kind).set(n)
        REJECTED_UNITS.set(len(self.store.rejected_units()))
