"""The sidecar's access log: one JSON object per request or connection, as Istio's JSON encoding writes.

Field names and types follow Istio's default JSON format (Envoy command operators): keys sorted as
Envoy writes them, response_code/bytes_received/bytes_sent/duration as numbers, everything else a
string or null when unknown. Lines are pure ASCII (non-ASCII escaped as \\uXXXX), so they survive
any sink's encoding; header bytes that are not UTF-8 appear as \\xNN, whether they arrive as bytes
or as str decoded with surrogateescape.

Writing is sans-IO in the sense that nothing here owns a timer: `log` appends to a buffer, which
is written when it reaches `buffer_bytes`, or by `tick(now)` once `flush_interval` has passed since
the last timed flush. Each write is whole lines of at most PIPE_BUF bytes followed by a flush, so
worker processes sharing one stdout pipe never interleave inside a line.

Off (Istio's empty accessLogFile) is `NullAccessLog`, whose methods do nothing; a hot path checks
`log.enabled` before it gathers the fields, so a disabled log costs one attribute read.
"""

from __future__ import annotations

import re
import select
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _enc
from typing import Any, TextIO

PIPE_BUF = select.PIPE_BUF  # writes up to this size to a pipe are atomic
_SURROGATE = re.compile("[\ud800-\udfff]")
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]


class AccessLog:
    """A worker's access log: JSON lines into a buffer, written to `out` (stdout) in whole lines."""

    enabled = True

    def __init__(self, out: TextIO | None = None, *, flush_interval: float = 1.0,
                 buffer_bytes: int = 64 * 1024) -> None:
        self.out = out if out is not None else sys.stdout
        self.flush_interval = flush_interval
        self.buffer_bytes = buffer_bytes
        self.dropped = 0  # lines lost because the sink failed
        self._lines: list[str] = []
        self._size = 0
        self._last_flush = -float("inf")
        self._second = -1
        self._second_text = ""

    def log(self, *, start_time: float, method: str | bytes | None = None, path: str | bytes | None = None,
            protocol: str | None = None, response_code: int = 0, response_flags: str = "-",
            bytes_received: int = 0, bytes_sent: int = 0, duration_ms: float = 0,
            upstream_service_time: int | str | bytes | None = None,
            x_forwarded_for: str | bytes | None = None,
            user_agent: str | bytes | None = None, request_id: str | bytes | None = None,
            authority: str | bytes | None = None, upstream_host: str | None = None,
            upstream_cluster: str | None = None, downstream_remote_address: str | None = None,
            downstream_local_address: str | None = None, route_name: str | None = None,
            requested_server_name: str | bytes | None = None,
            upstream_transport_failure_reason: str | None = None) -> None:
        """Buffer one line. `start_time` is wall-clock Unix seconds; `response_code` 0 means none was sent."""
        fields = (authority, int(bytes_received), int(bytes_sent), downstream_local_address,
                  downstream_remote_address, int(duration_ms), method, path, protocol, request_id,
                  requested_server_name, int(response_code), response_flags, route_name,
                  self._timestamp(start_time), upstream_cluster, upstream_host, upstream_service_time,
                  upstream_transport_failure_reason, user_agent, x_forwarded_for)
        try:  # every value an ASCII or valid Unicode str: one C call each
            line = _line(_enc, *fields)
            if "\\ud" in line:  # possibly a lone surrogate, escaped as such
                raise TypeError
        except TypeError:  # bytes, a number for a string, or a surrogate: the careful way
            line = _line(_json, *fields)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.buffer_bytes:
            self.flush()

    def tick(self, now: float) -> None:
        """Call from the worker's timer (monotonic `now`); writes what is buffered every `flush_interval`."""
        if self._lines and now - self._last_flush >= self.flush_interval:
            self._last_flush = now
            self.flush()

    def flush(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[str] = []
        size = written = 0
        try:
            for line in lines:  # ASCII only, so len() is the byte count
                if chunk and size + len(line) > PIPE_BUF:
                    self._write("".join(chunk))
                    written += len(chunk)
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write("".join(chunk))
        except (OSError, ValueError):  # a closed or broken sink: drop, never stop the proxy
            self.dropped += len(lines) - written

    def close(self) -> None:
        self.flush()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _timestamp(self, t: float) -> str:
        """ISO 8601 UTC with milliseconds, Envoy's START_TIME; strftime runs once per second."""
        second = int(t)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._second_text + _MILLIS[int((t - second) * 1000)]


class NullAccessLog:
    """The access log switched off."""

    enabled = False
    dropped = 0

    def log(self, **_fields: object) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def create(enabled: bool = True, out: TextIO | None = None, *, flush_interval: float = 1.0,
           buffer_bytes: int = 64 * 1024) -> AccessLog | NullAccessLog:
    """The access log for the mesh config: on by default (stdout), off when `enabled` is False."""
    if not enabled:
        return NullAccessLog()
    return AccessLog(out, flush_interval=flush_interval, buffer_bytes=buffer_bytes)


def _line(q: Callable[[Any], str], authority: Any, bytes_received: int, bytes_sent: int,
          downstream_local_address: Any, downstream_remote_address: Any, duration: int, method: Any,
          path: Any, protocol: Any, request_id: Any, requested_server_name: Any, response_code: int,
          response_flags: Any, route_name: Any, start_time: str, upstream_cluster: Any, upstream_host: Any,
          upstream_service_time: Any, upstream_transport_failure_reason: Any, user_agent: Any,
          x_forwarded_for: Any) -> str:
    """One JSON line, Envoy's keys in Envoy's (sorted) order; `q` quotes a string value."""
    return (
        f'{{"authority":{"null" if authority is None else q(authority)},"bytes_received":{bytes_received},'
        f'"bytes_sent":{bytes_sent},"downstream_local_address":'
        f'{"null" if downstream_local_address is None else q(downstream_local_address)},'
        f'"downstream_remote_address":'
        f'{"null" if downstream_remote_address is None else q(downstream_remote_address)},'
        f'"duration":{duration},"method":{"null" if method is None else q(method)},'
        f'"path":{"null" if path is None else q(path)},'
        f'"protocol":{"null" if protocol is None else q(protocol)},'
        f'"request_id":{"null" if request_id is None else q(request_id)},"requested_server_name":'
        f'{"null" if requested_server_name is None else q(requested_server_name)},'
        f'"response_code":{response_code},'
        f'"response_flags":{"null" if response_flags is None else q(response_flags)},'
        f'"route_name":{"null" if route_name is None else q(route_name)},"start_time":{q(start_time)},'
        f'"upstream_cluster":{"null" if upstream_cluster is None else q(upstream_cluster)},'
        f'"upstream_host":{"null" if upstream_host is None else q(upstream_host)},"upstream_service_time":'
        f'{"null" if upstream_service_time is None else q(upstream_service_time)},'
        f'"upstream_transport_failure_reason":'
        f'{"null" if upstream_transport_failure_reason is None else q(upstream_transport_failure_reason)},'
        f'"user_agent":{"null" if user_agent is None else q(user_agent)},'
        f'"x_forwarded_for":{"null" if x_forwarded_for is None else q(x_forwarded_for)}}}\n')


def _json(value: str | bytes | int) -> str:
    """A JSON string for any field value: bytes as UTF-8 with \\xNN for what is not, numbers as text."""
    if value.__class__ is not str:
        value = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    elif not value.isascii():
        value = _SURROGATE.sub(_unsurrogate, value)
    return _enc(value)


def _unsurrogate(match: re.Match[str]) -> str:
    """A lone surrogate: surrogateescape's stand-in for byte NN becomes \\xNN, any other U+FFFD."""
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"
