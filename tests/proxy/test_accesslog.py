"""The access log: Istio's JSON fields, escaping of arbitrary header bytes, buffering, switching off."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.proxy import flags
from dataplane.proxy.accesslog import PIPE_BUF, AccessLog, NullAccessLog, create

FIELDS = {
    "start_time", "method", "path", "protocol", "response_code", "response_flags", "bytes_received",
    "bytes_sent", "duration", "upstream_service_time", "x_forwarded_for", "user_agent", "request_id",
    "authority", "upstream_host", "upstream_cluster", "downstream_remote_address",
    "downstream_local_address", "route_name", "requested_server_name", "upstream_transport_failure_reason",
}
REQUEST = dict(
    method="GET", path="/reviews/0", protocol="HTTP/1.1", response_code=200, response_flags="-",
    bytes_received=0, bytes_sent=295, duration_ms=3.7, upstream_service_time="2", user_agent="curl/8.5.0",
    request_id="6f1c2a3e-3f4b-4c1d-9e0f-123456789abc", authority="reviews:9080",
    upstream_host="10.1.0.7:9080",
    upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
    downstream_remote_address="10.1.0.4:51234", downstream_local_address="10.96.0.12:9080",
    route_name="default",
)


class Sink(io.StringIO):
    """Records each write and flush, like the pipe under stdout would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


def stand_in(match: re.Match[str]) -> str:
    """What the log writes for a lone surrogate: the byte surrogateescape hid in it, else U+FFFD."""
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_line_per_request_with_istio_fields() -> None:
    out = io.StringIO()
    log = AccessLog(out)
    log.log(start_time=1_700_000_000.1234, **REQUEST)
    log.log(start_time=1_700_000_001.9996, downstream_remote_address="10.1.0.4:51240", response_code=0,
            response_flags=flags.join([flags.URX, flags.UF]),
            upstream_transport_failure_reason="connection refused")
    log.flush()
    first, second = lines(out)
    assert set(first) == set(second) == FIELDS
    assert list(first) == sorted(first)  # Envoy writes JSON keys sorted
    assert first == {
        "start_time": "2023-11-14T22:13:20.123Z", "method": "GET", "path": "/reviews/0",
        "protocol": "HTTP/1.1",
        "response_code": 200, "response_flags": "-", "bytes_received": 0, "bytes_sent": 295, "duration": 3,
        "upstream_service_time": "2", "x_forwarded_for": None, "user_agent": "curl/8.5.0",
        "request_id": "6f1c2a3e-3f4b-4c1d-9e0f-123456789abc", "authority": "reviews:9080",
        "upstream_host": "10.1.0.7:9080",
        "upstream_cluster": "outbound|9080||reviews.default.svc.cluster.local",
        "downstream_remote_address": "10.1.0.4:51234", "downstream_local_address": "10.96.0.12:9080",
        "route_name": "default", "requested_server_name": None, "upstream_transport_failure_reason": None,
    }
    assert second["start_time"] == "2023-11-14T22:13:21.999Z"
    assert (second["response_code"], second["response_flags"], second["method"]) == (0, "UF,URX", None)
    assert second["upstream_transport_failure_reason"] == "connection refused"


@given(st.binary(max_size=64), st.text(max_size=32))
def test_any_header_bytes_make_valid_json(raw: bytes, text: str) -> None:
    out = io.StringIO()
    log = AccessLog(out)
    decoded = raw.decode("utf-8", "surrogateescape")  # what a str-based parser hands over
    log.log(start_time=0.0, path=raw, user_agent=decoded, x_forwarded_for=text,
            authority=text + '"\\\n\t\x00')
    log.flush()
    line = out.getvalue()
    assert line.isascii() and line.endswith("\n") and line.count("\n") == 1
    entry = json.loads(line)
    assert entry["path"] == entry["user_agent"] == raw.decode("utf-8", "backslashreplace")
    assert entry["x_forwarded_for"] == re.sub("[\ud800-\udfff]", stand_in, text)
    assert entry["authority"].endswith('"\\\n\t\x00')
    line.encode("ascii")
    json.dumps(entry, ensure_ascii=False).encode("utf-8")  # no lone surrogates survive


def test_lone_surrogates_become_bytes_or_replacement_characters() -> None:
    out = io.StringIO()
    log = AccessLog(out)
    log.log(start_time=0.0, user_agent="a\udcffb\ud800c\U0001f600")
    log.flush()
    assert lines(out)[0]["user_agent"] == "a\\xffb\ufffdc\U0001f600"


def test_switched_off_writes_nothing() -> None:
    out = Sink()
    log = create(False, out)
    assert isinstance(log, NullAccessLog) and not log.enabled
    log.log(start_time=0.0, **REQUEST)
    log.tick(10.0)
    log.flush()
    log.close()
    assert out.writes == [] and out.flushes == 0 and out.getvalue() == ""
    assert create().enabled and create().out is sys.stdout


def test_buffer_is_written_by_tick_at_most_every_interval() -> None:
    out = io.StringIO()
    log = AccessLog(out, flush_interval=1.0)
    log.log(start_time=0.0, **REQUEST)
    assert out.getvalue() == ""  # buffered
    log.tick(100.0)
    assert len(lines(out)) == 1
    log.log(start_time=0.0, **REQUEST)
    log.tick(100.5)
    assert len(lines(out)) == 1  # not yet a second since the last timed flush
    log.tick(101.0)
    assert len(lines(out)) == 2
    log.tick(105.0)  # nothing buffered: nothing written
    assert len(lines(out)) == 2
    log.log(start_time=0.0, **REQUEST)
    log.close()
    assert len(lines(out)) == 3


def test_a_full_buffer_is_written_without_waiting_for_tick() -> None:
    probe = io.StringIO()
    one = AccessLog(probe)
    one.log(start_time=0.0, **REQUEST)
    one.flush()
    fill = -(-2000 // len(probe.getvalue()))  # lines that reach buffer_bytes
    out = io.StringIO()
    log = AccessLog(out, buffer_bytes=2000)
    for _ in range(fill - 1):
        log.log(start_time=0.0, **REQUEST)
    assert out.getvalue() == ""
    log.log(start_time=0.0, **REQUEST)
    assert len(lines(out)) == fill


def test_writes_are_whole_lines_within_pipe_buf() -> None:
    out = Sink()
    log = AccessLog(out, buffer_bytes=1 << 20)
    for i in range(200):
        log.log(start_time=float(i), **REQUEST)
    log.log(start_time=0.0, **{**REQUEST, "user_agent": "u" * 2 * PIPE_BUF})
    log.flush()
    assert len(out.writes) > 1 and out.flushes == len(out.writes)
    for chunk in out.writes:
        assert chunk.endswith("\n")
        assert len(chunk.encode()) <= PIPE_BUF or chunk.count("\n") == 1
    assert len(lines(out)) == 201


def test_a_broken_sink_drops_lines_and_counts_them() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    log = AccessLog(Broken())
    for _ in range(3):
        log.log(start_time=0.0, **REQUEST)
    log.tick(5.0)
    assert log.dropped == 3
    log.log(start_time=0.0, **REQUEST)
    log.close()
    assert log.dropped == 4


def test_response_flags_join_in_envoy_order() -> None:
    assert flags.join([]) == flags.NONE == "-"
    assert flags.join([flags.URX, flags.UF]) == "UF,URX"
    assert flags.join([flags.DC, flags.LH, flags.UH, flags.LH]) == "LH,UH,DC"
    assert len(set(flags.ORDER)) == len(flags.ORDER)
    with pytest.raises(KeyError):
        flags.join(["XX"])
