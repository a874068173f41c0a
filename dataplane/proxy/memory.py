"""What a proxy process holds in memory, for the admin's /memory (Envoy's page, its field names).

`allocated` counts the bytes malloc has handed out and not had back (glibc's mallinfo2: small
blocks plus mmap'd ones), which is where native leaks show: OpenSSL's sessions and connections,
and Python objects too big for its own allocator. Python's small objects live in arenas outside
malloc and show only in `total_physical_bytes` (the resident set). Without glibc (musl, say)
the malloc fields are absent and the page says so, rather than reporting zeros.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
TRIM_ABOVE = 2 << 20  # free bytes malloc may keep before `release` hands them back


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _libc() -> tuple[Any, Any]:
    """glibc's mallinfo2 (2.33+) and malloc_trim, or (None, None) where this libc has them not."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        info, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None, None
    info.restype, info.argtypes = _MallInfo2, []
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return info, trim


_MALLINFO2, _MALLOC_TRIM = _libc()
_free_after_trim = 0  # malloc's free bytes after the last trim (release)


def rss_bytes(pid: int | str = "self") -> int:
    """The resident set of `pid` (this process by default), from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def usage() -> dict[str, Any]:
    """This process: `allocated` and `heap_size` (malloc's, when glibc tells), `pageheap_free` (held
    by malloc, not in use) and `total_physical_bytes` (resident), all in bytes."""
    out: dict[str, Any] = {"pid": os.getpid(), "total_physical_bytes": rss_bytes()}
    if _MALLINFO2 is None:
        out["malloc"] = "unavailable: this libc has no mallinfo2"
        return out
    info = _MALLINFO2()
    out.update(allocated=info.uordblks + info.hblkhd, heap_size=info.arena + info.hblkhd,
               pageheap_free=info.fordblks)
    return out


def release(above: int = TRIM_ABOVE) -> bool:
    """Give malloc's free pages back to the system once `above` more bytes lie free than after the
    last time. glibc returns only the top of its heap on its own; a worker's heap, where each
    connection's and TLS handshake's buffers come and go between long-lived objects, keeps free
    holes in the middle that the resident set would carry for good (tcmalloc, Envoy's, releases
    free pages in the background). Free bytes stay free bytes to mallinfo after a trim, hence
    the growth since the last one. True when it trimmed."""
    global _free_after_trim
    if _MALLINFO2 is None:
        return False
    free = _MALLINFO2().fordblks
    if free - _free_after_trim <= above:
        _free_after_trim = min(_free_after_trim, free)
        return False
    _MALLOC_TRIM(0)
    _free_after_trim = _MALLINFO2().fordblks
    return True


def merge(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """The page: each field summed over the processes (as Envoy's strings), and each process."""
    total = {k: str(sum(p.get(k, 0) for p in processes))
             for k in ("allocated", "heap_size", "pageheap_free", "total_physical_bytes")
             if all(k in p for p in processes)}
    return {**total, "processes": processes}
