"""The channel between the proxy's supervisor and its workers: msgpack frames on a socketpair.

The supervisor owns the bus side (config, ACK/NACK) and the admin and metrics ports; each
worker owns a reactor and its share of the connections. They speak in small request/reply
frames: `config` (apply this; reply `applied` or `rejected` with the reason), `stats`
(reply this worker's metrics snapshot), `clusters` (endpoint state for /clusters) and
`drain`. A frame is a 4-byte big-endian length and a msgpack map; `FrameReader` is the
sans-IO decoder both sides use.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

MAX_FRAME = 64 * 1024 * 1024  # a 1000-service config is ~1.3 MB; anything near this is garbage
_LEN = struct.Struct(">I")


class FrameError(ValueError):
    pass


def frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Feed bytes, take whole messages; a length over MAX_FRAME or a non-map body is an error."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            try:
                message = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                raise FrameError(f"undecodable frame: {exc}") from exc
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise FrameError("a frame must be a map with an 'op'")
            out.append(message)
        return out
