"""The envelope codec, without sockets: round trips and every kind of garbage."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest

from bus import envelope as E
from bus.envelope import DecodeError


def test_round_trip_keeps_every_field() -> None:
    env = E.make("cfg/p1", E.UPDATE, {"routes": [1, 2]}, seq=7, epoch=9, origin="pilot",
                 config_version="v1", prev={"cfg/": 6}, sig=b"s" * 64)
    back = E.decode(env.frames())
    assert back == env
    assert back.value() == {"routes": [1, 2]}


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"a", b"b"], "frame_count"),
        ([b"a", b"b", b"c", b"d"], "frame_count"),
        ([b"t", b"\xc1\xc1", b""], "bad_header"),
        ([b"t", msgpack.packb([1, 2]), b""], "bad_header"),
        ([b"t", msgpack.packb({"v": 99, "k": "upd"}), b""], "bad_version"),
        ([b"t", msgpack.packb({"k": "upd"}), b""], "bad_version"),
        ([b"t", msgpack.packb({"v": 1, "k": "nope"}), b""], "bad_kind"),
        ([b"t", msgpack.packb({"v": 1, "k": "upd", "s": "7"}), b""], "bad_header"),
        ([b"t", msgpack.packb({"v": 1, "k": "upd", "s": True}), b""], "bad_header"),
        ([b"t", msgpack.packb({"v": 1, "k": "upd", "p": {"a": "x"}}), b""], "bad_header"),
        ([b"\xff\xfe", msgpack.packb({"v": 1, "k": "upd"}), b""], "bad_topic"),
        ([b"x" * 5000, msgpack.packb({"v": 1, "k": "upd"}), b""], "topic_too_long"),
        ([b"t", b"\x00" * (E.MAX_HEADER + 1), b""], "header_too_large"),
    ],
)
def test_garbage_is_a_decode_error_with_a_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        E.decode(frames)
    assert info.value.reason == reason


def test_body_over_the_limit_is_refused() -> None:
    env = E.make("t", E.UPDATE, body=b"x" * 101)
    with pytest.raises(DecodeError, match="body_too_large"):
        E.decode(env.frames(), max_body=100)
    assert E.decode(env.frames(), max_body=101).body == b"x" * 101


def test_bad_body_fails_only_when_read() -> None:
    env = E.decode(E.make("t", E.UPDATE, body=b"\xc1").frames())
    with pytest.raises(DecodeError, match="bad_body"):
        env.value()


def test_random_garbage_never_raises_anything_else() -> None:
    rng = random.Random(1234)
    good = E.make("cfg/x", E.UPDATE, {"a": 1}).frames()
    for _ in range(3000):
        n = rng.choice([0, 1, 2, 3, 3, 3, 4, 7])
        frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]
        if n == 3 and rng.random() < 0.5:  # mutate a valid message byte by byte
            frames = [bytearray(f) for f in good]
            f = rng.randrange(3)
            if frames[f]:
                frames[f][rng.randrange(len(frames[f]))] ^= 1 << rng.randrange(8)
            frames = [bytes(f) for f in frames]
        with contextlib.suppress(DecodeError):
            E.decode(frames).value()


def test_snapshot_frames_must_match_their_count() -> None:
    head = E.make("cfg/", E.SNAPSHOT, count=2)
    entry = E.make("cfg/a", E.UPDATE, 1)
    frames = head.frames() + entry.frames() + entry.frames()
    got_head, entries, errors = E.decode_snapshot(frames)
    assert got_head.count == 2 and len(entries) == 2 and errors == []
    big = E.make("cfg/big", E.UPDATE, body=b"x" * 200)
    _, entries, errors = E.decode_snapshot(head.frames() + entry.frames() + big.frames(), max_body=100)
    assert [e.topic for e in entries] == ["cfg/a"] and [e.reason for e in errors] == ["body_too_large"]
    with pytest.raises(DecodeError, match="frame_count"):
        E.decode_snapshot(frames[:-3])
    with pytest.raises(DecodeError, match="frame_count"):
        E.decode_snapshot(frames[:-1])
    with pytest.raises(DecodeError, match="bad_kind"):
        E.decode_snapshot(entry.frames())
