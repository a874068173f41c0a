"""Linux inotify through ctypes (the standard library has none), with a polling fallback.

Only what a config directory watcher needs: watch directories, read batches of events.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Not IN_MODIFY: a file is read when its writer closes it (or renames it into place), never
# half-written. (An in-place save truncates first; reading then would see an empty file.)
WATCH_MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
              | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True)
class Event:
    path: str  # the directory watched, joined with the entry name
    mask: int


class Inotify:
    """A non-blocking inotify instance; `fileno()` goes into a poller."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, str] = {}

    def fileno(self) -> int:
        return self.fd

    def watch(self, directory: str) -> None:
        wd = self._add(self.fd, os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._dirs[wd] = directory

    def read(self) -> list[Event]:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            base = self._dirs.get(wd, "")
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and not name:
                self._dirs.pop(wd, None)
            events.append(Event(os.path.join(base, os.fsdecode(name)) if name else base, mask))
        return events

    def close(self) -> None:
        os.close(self.fd)
