"""The directory source: every *.yaml/*.yml file under a directory is one config unit.

inotify tells us which files changed (editors' atomic rename-over included); where
inotify is unavailable, the directory is polled. Either way a changed file is re-read
whole and handed to the store, which keeps its last valid version if it is broken.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from bus.logs import Log
from bus.loop import Loop
from controlplane.config.validate import YAML_SUFFIXES
from controlplane.config.yamlload import read_config_file
from controlplane.galley.inotify import IN_CREATE, IN_ISDIR, IN_MOVED_TO, IN_Q_OVERFLOW, Inotify
from controlplane.galley.metrics import SOURCE_ERRORS

_SETTLE_NS = 100_000_000  # polling reads a file only once it has not changed for 100 ms
OnUnit = Callable[[str, str | None], None]  # (unit, text or None when gone)


def is_config_file(path: Path) -> bool:
    """Editors' swap and backup files are not config."""
    name = path.name
    return path.suffix in YAML_SUFFIXES and not name.startswith(".") and not name.endswith("~")


class DirectorySource:
    def __init__(self, loop: Loop, directory: str | os.PathLike, on_unit: OnUnit,
                 poll_interval: float = 0.5, use_inotify: bool = True) -> None:
        self.loop = loop
        self.root = Path(directory).resolve()
        self.on_unit = on_unit
        self.log = Log("galley.source-dir", dir=str(self.root))
        self._seen: dict[str, tuple[int, int, int]] = {}  # unit -> (inode, size, mtime_ns)
        self._inotify: Inotify | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        if use_inotify:
            try:
                self._inotify = Inotify()
                self._watch_tree(self.root)
                loop.add_reader(self._inotify.fileno(), self._on_events)
            except OSError as exc:
                self.log.warning("inotify unavailable; polling", error=str(exc))
                self._inotify = None
        self.mode = "inotify" if self._inotify else "poll"
        # polling runs in both modes: with inotify it is a slow safety net for missed events
        loop.call_every(poll_interval if self._inotify is None else 10 * poll_interval, self.scan)
        loop.on_close(self.close)

    def start(self) -> None:
        """Read everything once (in the loop thread)."""
        self.scan(settle=False)

    def close(self) -> None:
        if self._inotify is not None:
            self.loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _watch_tree(self, top: Path) -> None:
        assert self._inotify is not None
        for dirpath, dirnames, _ in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            self._inotify.watch(dirpath)

    def _unit(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _on_events(self) -> None:
        assert self._inotify is not None
        touched: set[Path] = set()
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                self.scan()
                return
            path = Path(event.path)
            if event.mask & IN_ISDIR:
                if event.mask & (IN_CREATE | IN_MOVED_TO) and path.is_dir():
                    self._watch_tree(path)
                    self.scan()  # files may have landed before the watch
                elif not path.exists():
                    self.scan()  # a directory went away with its files
                continue
            if is_config_file(path):
                touched.add(path)
        for path in sorted(touched):
            self._reload(path)

    def _reload(self, path: Path) -> None:
        unit = self._unit(path)
        try:
            st = path.stat()
            text = read_config_file(path)
        except FileNotFoundError:
            if self._seen.pop(unit, None) is not None:
                self.on_unit(unit, None)
            return
        except (OSError, UnicodeDecodeError) as exc:
            SOURCE_ERRORS.labels("dir").inc()
            self.log.warning("cannot read config file; its last valid version stays", file=unit,
                             error=str(exc))
            return
        self._seen[unit] = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.on_unit(unit, text)

    def scan(self, settle: bool = True) -> None:
        """Compare the tree with what we last read; reload what differs (with `settle`, only
        files that have not changed for a moment: one modified right now may be mid-write)."""
        current: dict[str, tuple[int, int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = Path(dirpath) / name
                if not is_config_file(path):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    current[self._unit(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
        for unit in sorted(set(self._seen) - set(current)):
            del self._seen[unit]
            self.on_unit(unit, None)
        settled = time.time_ns() - (_SETTLE_NS if settle else 0)
        for unit, sig in sorted(current.items()):
            if self._seen.get(unit) != sig and sig[2] <= settled:
                self._reload(self.root / unit)


def write_atomically(path: Path, text: str) -> None:
    """Write as editors do (temp file + rename), so a watcher never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
