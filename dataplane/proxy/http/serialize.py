"""HTTP/1.1 serializers: the bytes the proxy writes for heads, chunks and canned errors (the codec's
parsers read them back; codec.py)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from http import HTTPStatus

from dataplane.proxy.http.codec import TOKEN_RE, VALUE_RE

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                 version: bytes = b"1.1") -> bytes:
    """A request head. Fields go out as given: names and values must be valid (parsed ones
    are; check configured ones once with `valid_field`), framing fields are the caller's."""
    out = [method, b" ", target, b" HTTP/", version, b"\r\n"]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def response_head(status: int, headers: Iterable[tuple[bytes, bytes]], reason: bytes | None = None,
                  version: bytes = b"1.1") -> bytes:
    """A response head; `reason` defaults to the standard phrase. Same rules as request_head."""
    out = [status_line(status, version) if reason is None
           else b"HTTP/%s %d %s\r\n" % (version, status, reason)]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


@lru_cache(maxsize=256)
def status_line(status: int, version: bytes = b"1.1") -> bytes:
    """`HTTP/<version> <status> <standard phrase>` and CRLF (no phrase for an unknown status)."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/%s %d %s\r\n" % (version, status, phrase)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data gives b"" (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """The end of a chunked body, with optional trailer fields."""
    out = [b"0\r\n"]
    for name, value in trailers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


@lru_cache(maxsize=64)
def error_response(status: int, detail: str | None = None) -> bytes:
    """A complete canned error response (400, 408, 414, 431, 502, 503, 504...) that closes the
    connection; the plain-text body is the status phrase, plus `detail` when given."""
    phrase = status_line(status, b"1.1")[13:-2]
    body = phrase + (b": " + detail.encode("utf-8", "replace") if detail else b"") + b"\n"
    return status_line(status, b"1.1") + (
        b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)) + body


def valid_field(name: bytes, value: bytes) -> bool:
    """Whether a configured field may be serialized as is (check header ops once, at load)."""
    return TOKEN_RE.fullmatch(name) is not None and VALUE_RE.fullmatch(value) is not None
