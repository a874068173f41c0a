"""The etcd source: every key under a prefix is one config unit (a YAML document set).

A watcher thread loads the prefix, then watches from the next revision. A broken
stream reconnects with backoff and resumes from the last revision it saw; a
compacted revision means events were lost, so it reloads in full (deleting units
that vanished). Units reach galley's loop through `call_soon_threadsafe`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from bus.logs import Log
from bus.loop import Loop
from controlplane.galley.etcd import Compacted, EtcdClient, EtcdError
from controlplane.galley.metrics import SOURCE_ERRORS

OnUnit = Callable[[str, str | None], None]


class EtcdSource:
    def __init__(self, loop: Loop, endpoint: str, prefix: str, on_unit: OnUnit,
                 max_backoff: float = 2.0) -> None:
        self.loop = loop
        self.client = EtcdClient(endpoint)
        self.prefix = prefix
        self.on_unit = on_unit
        self.max_backoff = max_backoff
        self.revision = 0
        self.reloads = 0
        self.reconnects = 0
        self.log = Log("galley.source-etcd", endpoint=endpoint, prefix=prefix)
        self._keys: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-source", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _emit(self, key: str, value: str | None) -> None:
        self.loop.call_soon_threadsafe(lambda: self.on_unit(key, value))

    def _reload(self) -> None:
        revision, kvs = self.client.get_prefix(self.prefix)
        present = {kv.key for kv in kvs}
        for key in sorted(self._keys - present):
            self._emit(key, None)
        for kv in kvs:
            self._emit(kv.key, kv.value)
        self._keys = present
        self.revision = revision
        self.reloads += 1
        self.log.info("loaded", keys=len(kvs), revision=revision)

    def _run(self) -> None:
        backoff = 0.1
        need_reload = True
        while not self._stop.is_set():
            try:
                if need_reload:
                    self._reload()
                    need_reload = False
                for event in self.client.watch(self.prefix, self.revision + 1, idle_timeout=5.0):
                    backoff = 0.1
                    if event.type == "DELETE":
                        self._keys.discard(event.key)
                        self._emit(event.key, None)
                    else:
                        self._keys.add(event.key)
                        self._emit(event.key, event.value)
                    self.revision = max(self.revision, event.revision)
                    if self._stop.is_set():
                        return
            except Compacted as exc:
                self.log.warning("watch revision compacted; reloading", revision=self.revision,
                                 compact_revision=exc.compact_revision)
                need_reload = True
            except EtcdError as exc:
                if "timed out" in str(exc):
                    continue  # an idle stream: resume from the same revision
                SOURCE_ERRORS.labels("etcd").inc()
                self.reconnects += 1
                self.log.warning("etcd unavailable; retrying", error=str(exc), backoff=backoff,
                                 revision=self.revision)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)
