"""Istio's request path normalisation (meshConfig.pathNormalization), sans-IO.

The sidecar normalises a request's path once, before authorization and routing, and forwards the
normalised path (as Envoy does with normalize_path, merge_slashes and
path_with_escaped_slashes_action), so a policy on `/admin` sees every spelling of `/admin` the app
will serve. The modes, as Istio defines them:

* NONE: the path as received.
* BASE (Istio's default, also DEFAULT): RFC 3986 normalisation as Envoy's normalize_path does it:
  percent-escapes of unreserved characters decoded once (`%61` -> `a`, `%2e` -> `.`; never twice),
  the other escapes' hex upper-cased, backslashes turned into slashes, dot segments removed.
* MERGE_SLASHES: BASE, then runs of slashes merged (`//admin` -> `/admin`).
* DECODE_AND_MERGE_SLASHES: `%2F` and `%5C` decoded first (to `/` and `\\`), then MERGE_SLASHES.

In every mode a `%00` is refused (Istio rejects it whatever the setting); outside NONE so is a
malformed escape (`%` not followed by two hex digits). Only the path is touched: the caller splits
off the query, which goes on as received.
"""

from __future__ import annotations

import re

NONE, BASE, MERGE_SLASHES = "NONE", "BASE", "MERGE_SLASHES"
DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"
MODES = (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
DEFAULT = BASE  # Istio's DEFAULT is BASE

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_SLASHES = re.compile(rb"//+")


class PathError(ValueError):
    """A path no mode may forward (the proxy answers 400 with the message)."""


def normalize(path: bytes, mode: str = DEFAULT) -> bytes:
    """The path (no query) as `mode` normalises it; raises PathError for %00 or a bad escape."""
    if b"%" in path:
        if b"%00" in path:
            raise PathError("%00 in the path")
        if mode == NONE:
            return path
        if _BAD_ESCAPE.search(path):
            raise PathError("malformed percent-encoding in the path")
        slashes = mode == DECODE_AND_MERGE_SLASHES
        path = _ESCAPE.sub(lambda m: _unescape(m, slashes), path)
    elif mode == NONE:
        return path
    if b"\\" in path:
        path = path.replace(b"\\", b"/")
    if b"/." in path:
        path = remove_dot_segments(path)
    if mode != BASE and b"//" in path:
        path = _SLASHES.sub(b"/", path)
    return path


def _unescape(m: re.Match[bytes], slashes: bool) -> bytes:
    byte = int(m.group(1), 16)
    if byte in _UNRESERVED or (slashes and byte in (0x2F, 0x5C)):
        return bytes((byte,))
    return m.group(0).upper()


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 for an absolute path: `.` segments dropped, `..` drops the one before (never
    above the root); a path ending in a dot segment keeps its trailing slash."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)
