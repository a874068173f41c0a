"""The workloads directory, polled: one `*.yaml` / `*.yml` / `*.json` file per workload.

Polling (once a second by default) rather than galley's inotify watcher, which reads
only YAML names: a node holds a few dozen small files, so a scan costs next to nothing.
A file is read once it has stopped changing for a moment, so a half-written one is not
taken for a broken one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bus.logs import Log
from bus.loop import Loop

SUFFIXES = (".yaml", ".yml", ".json")
_SETTLE_NS = 100_000_000
MAX_FILES = 4096  # bounds one scan; a node never runs this many workloads

OnFile = Callable[[str, str | None], None]  # (file name, text or None when gone)


def _listing(root: Path) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    try:
        entries = os.scandir(root)
    except FileNotFoundError:
        return out
    with entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.endswith("~") or not name.endswith(SUFFIXES):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.is_file():
                out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
            if len(out) >= MAX_FILES:
                break
    return out


class WorkloadDir:
    def __init__(self, loop: Loop, directory: str | os.PathLike, on_file: OnFile,
                 interval: float = 1.0) -> None:
        self.root = Path(directory)
        self.on_file = on_file
        self.log = Log("nodeagent", dir=str(self.root))
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._timer = loop.call_every(interval, self.scan)
        loop.on_close(self._timer.cancel)

    def scan(self, settle: bool = True) -> None:
        current = _listing(self.root)
        for name in sorted(set(self._seen) - set(current)):
            del self._seen[name]
            self.on_file(name, None)
        settled = time.time_ns() - (_SETTLE_NS if settle else 0)
        for name, sig in sorted(current.items()):
            if self._seen.get(name) == sig or sig[2] > settled:
                continue
            try:
                text = (self.root / name).read_text()
            except FileNotFoundError:
                continue  # gone since the listing; the next scan reports it
            except (OSError, UnicodeDecodeError) as exc:
                self._seen[name] = sig  # read again once it changes
                self.log.warning("cannot read workload file; its last version stays", file=name,
                                 error=str(exc))
                continue
            self._seen[name] = sig
            self.on_file(name, text)
