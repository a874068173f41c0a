"""Envelope codec: the `[topic, header, body]` frames every bus message travels in.

Sans-IO. `decode` never raises anything but `DecodeError`, whose `reason` is a
short metric label, so a receive loop can count garbage and carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

SCHEMA_VERSION = 1
MAX_TOPIC = 1024
MAX_HEADER = 64 * 1024
# Body limits, per what a socket receives. `decode` checks them, and `frame_limit` turns the same
# number into the socket's ZMQ_MAXMSGSIZE (bus.context.socket), so libzmq drops a peer that sends
# a bigger frame before allocating it. Measured at 1000 services: the largest config part is 40 KB,
# a whole proxy config (the `config` RPC reply) 1.4 MB.
MAX_CONTROL_BODY = 0                  # subscriptions and snapshot requests carry no body
DEFAULT_MAX_BODY = 4 * 1024 * 1024    # config parts, snapshots, RPC requests, report batches
MAX_REPLY_BODY = 16 * 1024 * 1024     # RPC replies (a whole proxy config)
# CURVE wraps each frame in a MESSAGE command (33 bytes); libzmq checks the wrapped size.
_FRAME_SLACK = 1024

# Message kinds.
UPDATE = "upd"
DELETE = "del"
HEARTBEAT = "hb"
SNAPSHOT_REQUEST = "snapreq"
SNAPSHOT = "snap"
REQUEST = "req"
REPLY = "rep"
ERROR = "err"
REPORT = "rpt"
KINDS = frozenset(
    {UPDATE, DELETE, HEARTBEAT, SNAPSHOT_REQUEST, SNAPSHOT, REQUEST, REPLY, ERROR, REPORT}
)

# Header fields covered by the origin's signature, in signing order. `prev` (the
# per-prefix chain) and `id`/`n` are transport bookkeeping that relays rewrite.
SIGNED_FIELDS = ("v", "k", "s", "e", "o", "cv", "t")

# Exact types per header field (bool is not an int here, unlike isinstance).
_FIELD_TYPES: dict[str, frozenset[type]] = {
    "v": frozenset({int}),
    "k": frozenset({str}),
    "s": frozenset({int}),
    "e": frozenset({int}),
    "o": frozenset({str}),
    "cv": frozenset({str}),
    "t": frozenset({int, float}),
    "sig": frozenset({bytes}),
    "p": frozenset({dict}),
    "id": frozenset({bytes}),
    "n": frozenset({int}),
}


class DecodeError(Exception):
    """A message that must be dropped; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Envelope:
    """One decoded message. `body` stays as raw msgpack bytes until asked for."""

    topic: str
    kind: str
    seq: int = 0
    epoch: int = 0
    origin: str = ""
    config_version: str = ""
    ts: float = 0.0
    body: bytes = b""
    sig: bytes | None = None
    prev: dict[str, int] = field(default_factory=dict)
    req_id: bytes | None = None
    count: int = 0

    def value(self) -> Any:
        """The body decoded from msgpack (raises DecodeError on a bad body)."""
        return unpack_body(self.body)

    def signed_fields(self) -> list[Any]:
        return [SCHEMA_VERSION, self.kind, self.seq, self.epoch, self.origin,
                self.config_version, self.ts]

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = dict(zip(SIGNED_FIELDS, self.signed_fields(), strict=True))
        if self.sig is not None:
            h["sig"] = self.sig
        if self.prev:
            h["p"] = self.prev
        if self.req_id is not None:
            h["id"] = self.req_id
        if self.count:
            h["n"] = self.count
        return h

    def frames(self) -> list[bytes]:
        return [self.topic.encode(), msgpack.packb(self.header(), use_bin_type=True), self.body]


def make(topic: str, kind: str, value: Any = None, *, body: bytes | None = None,
         **fields: Any) -> Envelope:
    """Build an envelope, packing `value` unless raw `body` bytes are given."""
    if body is None:
        body = b"" if value is None else pack_body(value)
    fields.setdefault("ts", time.time())
    return Envelope(topic=topic, kind=kind, body=body, **fields)


def frame_limit(max_body: int) -> int:
    """The largest wire frame a socket that takes bodies up to `max_body` may accept: any bigger
    one cannot decode (topic, header and body are one frame each)."""
    return max(max_body, MAX_HEADER, MAX_TOPIC) + _FRAME_SLACK


def pack_body(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_body(body: bytes) -> Any:
    if not body:
        return None
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise DecodeError("bad_body", str(exc)) from None


def decode(frames: list[bytes], max_body: int = DEFAULT_MAX_BODY) -> Envelope:
    """Decode exactly three frames into an Envelope, or raise DecodeError."""
    if len(frames) != 3:
        raise DecodeError("frame_count", f"expected 3 frames, got {len(frames)}")
    return decode_triplet(frames[0], frames[1], frames[2], max_body)


def decode_triplet(topic: bytes, header: bytes, body: bytes,
                   max_body: int = DEFAULT_MAX_BODY) -> Envelope:
    if len(topic) > MAX_TOPIC:
        raise DecodeError("topic_too_long", f"{len(topic)} bytes")
    if len(header) > MAX_HEADER:
        raise DecodeError("header_too_large", f"{len(header)} bytes")
    if len(body) > max_body:
        raise DecodeError("body_too_large", f"{len(body)} bytes > {max_body}")
    try:
        topic_s = bytes(topic).decode()
    except UnicodeDecodeError:
        raise DecodeError("bad_topic", "topic is not UTF-8") from None
    try:
        h = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except Exception as exc:
        raise DecodeError("bad_header", str(exc)) from None
    if not isinstance(h, dict):
        raise DecodeError("bad_header", "header is not a map")
    version = h.get("v")
    if version != SCHEMA_VERSION:
        raise DecodeError("bad_version", f"schema version {version!r}")
    for name, value in h.items():
        expected = _FIELD_TYPES.get(name)
        if expected is not None and type(value) not in expected:  # unknown fields: newer minors
            raise DecodeError("bad_header", f"field {name!r} has type {type(value).__name__}")
    kind = h.get("k")
    if kind not in KINDS:
        raise DecodeError("bad_kind", f"kind {kind!r}")
    prev = h.get("p") or {}
    for k, v in prev.items():
        if type(k) is not str or type(v) is not int:
            raise DecodeError("bad_header", "field 'p' must map str to int")
    return Envelope(
        topic=topic_s, kind=kind, seq=h.get("s", 0), epoch=h.get("e", 0),
        origin=h.get("o", ""), config_version=h.get("cv", ""), ts=float(h.get("t", 0.0)),
        body=bytes(body), sig=h.get("sig"), prev=prev, req_id=h.get("id"), count=h.get("n", 0),
    )


def decode_snapshot(frames: list[bytes], max_body: int = DEFAULT_MAX_BODY
                    ) -> tuple[Envelope, list[Envelope], list[DecodeError]]:
    """A snapshot reply: one SNAPSHOT envelope, then `count` entry triplets.

    A bad head or frame count rejects the whole reply; a bad entry (say, one over this
    receiver's body limit) is left out and returned among the errors, so one entry the
    receiver cannot take does not keep it from syncing the rest.
    """
    if len(frames) < 3 or len(frames) % 3:
        raise DecodeError("frame_count", f"snapshot with {len(frames)} frames")
    head = decode_triplet(frames[0], frames[1], frames[2], max_body)
    if head.kind != SNAPSHOT:
        raise DecodeError("bad_kind", f"expected snapshot, got {head.kind}")
    if head.count != len(frames) // 3 - 1:
        raise DecodeError("frame_count", f"snapshot says {head.count} entries")
    entries: list[Envelope] = []
    errors: list[DecodeError] = []
    for i in range(3, len(frames), 3):
        try:
            entries.append(decode_triplet(frames[i], frames[i + 1], frames[i + 2], max_body))
        except DecodeError as exc:
            errors.append(exc)
    return head, entries, errors
