"""HTTP/1.1 codec for the sidecar: sans-IO parsers (serializers: serialize.py), built for the hot path.

The proxy owns the sockets; this module only turns bytes into events and events into bytes.
`RequestParser` reads what a client sends, `ResponseParser` what an upstream answers. Both
follow the same loop::

    parser.feed(data)                    # bytes from recv(); b"" is not EOF, use feed_eof()
    while True:
        ev = parser.next_event()         # an event, or NEED_DATA / PAUSED / CLOSED
        if ev is NEED_DATA: break
        ...

Every head (`Request`, `Response`) is followed by zero or more `Data` and one `EndOfMessage`,
except informational responses (1xx other than 101), which stand alone. Pipelined messages come
out one after another, in order; pulling is lazy, so a proxy that stops calling `next_event`
after an `EndOfMessage` leaves the next request buffered until the current response is done.
What is not pulled yet stays buffered (`parser.buffered`): stop reading from a peer while that
grows (pipelining) or while a parser is PAUSED, as feeding then copies the unread bytes.

Speed: no per-byte Python. A head is found with one `bytes.find(b"\\r\\n\\r\\n")`, its field
lines are split, validated and whitespace-trimmed by a single `re.findall`, and the framing
fields are picked out in one pass. Body bytes are sliced, never copied byte by byte; several
complete chunks already in the buffer come out as one `Data`. A head fed one byte at a time is
searched only from where the previous search stopped, and a long one grows in a bytearray, so
slow clients cost O(n), not O(n^2).
States are plain functions taking the parser (not bound methods, which would make every parser
a reference cycle that only the cyclic GC can free).

Strictness follows RFC 9112's request-smuggling defences: CR and LF only as CRLF pairs, no
obs-fold, no whitespace before a field colon, no control characters, one Content-Length value
(identical repeats are merged: `headers` keeps one field with the single value), no
Content-Length together with Transfer-Encoding, and in requests no transfer coding but
`chunked`, which must come last.

Errors raise `HTTPError(status, reason)`: `status` is what the proxy answers before closing
(RequestParser: 400, 413, 414, 431, 501, 505; ResponseParser: always 502). After an error the
parser is dead: every further `next_event` raises the same error.

Timeouts are the proxy's job; `parser.state` tells it what a timer firing means:
IDLE (between messages, nothing buffered: close quietly), HEAD (part of a head buffered:
answer 408 on the client side, 504 upstream), BODY (inside a body), PAUSED, TUNNEL, CLOSED,
ERROR.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Fields = list[tuple[bytes, bytes]]
# start line, fields, Content-Length, Transfer-Encoding, Connection tokens, Host, Upgrade, Expect
_Head = tuple[bytes, Fields, int | None, bytes | None, tuple[bytes, ...], bytes | None, bytes | None, bool]


class HTTPError(Exception):
    """A message the codec refuses; `status` is the answer the proxy sends before closing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class _Sentinel:
    """A control value of `next_event`, compared with `is`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes (or feed_eof), then call next_event again
PAUSED = _Sentinel("PAUSED")  # after an Upgrade/CONNECT request: call start_tunnel() or resume()
CLOSED = _Sentinel("CLOSED")  # no further message on this connection (close, EOF)


@dataclass(slots=True)
class Request:
    """A request head. `headers` keeps every field in order, names lower-cased.

    The other attributes are read from `headers` in the same pass, for the proxy's fast path:
    `content_length` (None when absent), `chunked`, `keep_alive` (version default and
    Connection), `host`, `upgrade` (the Upgrade value, only when Connection lists "upgrade" in
    HTTP/1.1), `expect_continue` (HTTP/1.1 `Expect: 100-continue`) and `connection` (the
    lower-cased Connection tokens: hop-by-hop fields the proxy must not forward).
    """

    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: Fields
    content_length: int | None
    chunked: bool
    keep_alive: bool
    host: bytes | None
    upgrade: bytes | None
    expect_continue: bool
    connection: tuple[bytes, ...]


@dataclass(slots=True)
class Response:
    """A response head; like `Request`. A status below 200 other than 101 is informational: no
    body, no EndOfMessage, and the final response still follows. The framing flags mirror the fields;
    whether a body follows (HEAD, 1xx, 204, 304) the parser decides from the request method.
    """

    status: int
    reason: bytes
    version: bytes
    headers: Fields
    content_length: int | None
    chunked: bool
    keep_alive: bool
    upgrade: bytes | None
    connection: tuple[bytes, ...]


@dataclass(slots=True)
class Data:
    """A piece of body, already de-chunked."""

    data: bytes


@dataclass(slots=True, frozen=True)
class EndOfMessage:
    """The end of a message (frozen: the usual one is shared). `trailers` are a chunked body's
    trailer fields as received, names lower-cased; before forwarding them, drop those that
    must not be trailers (framing, routing, authentication: RFC 9110 6.5.1)."""

    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(slots=True)
class TunnelData:
    """Raw bytes after a switch to a tunnel (101, CONNECT 2xx): not HTTP any more."""

    data: bytes


Event = Request | Response | Data | EndOfMessage | TunnelData | _Sentinel

_EOM = EndOfMessage()

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_VCHAR = rb"\x21-\x7e\x80-\xff"  # visible characters and obs-text
# One field line, preceded by the LF that ends the previous line: the name must touch the
# colon, surrounding whitespace is trimmed, the value holds no control character, and the
# line ends in CRLF. A match can start only at an LF, so a line that fails cannot be matched
# from its middle: counting matches against LFs validates the whole block.
# No possessive quantifiers: CPython before 3.11.5 (Debian 12's python3 is 3.11.2) mis-matches
# possessive groups (gh-106052). Linear all the same: a value is runs of visible characters
# separated by whitespace runs, two disjoint classes that each run must take whole, so a failed
# line backtracks through each run once.
_FIELD_RE = re.compile(
    rb"\n([" + _TCHAR + rb"]+):[ \t]*((?:[" + _VCHAR + rb"]+(?:[ \t]+[" + _VCHAR + rb"]+)*)?)[ \t]*\r(?=\n)"
)
TOKEN_RE = re.compile(rb"[" + _TCHAR + rb"]+")
VALUE_RE = re.compile(rb"(?:[" + _VCHAR + rb"]+(?:[ \t]+[" + _VCHAR + rb"]+)*)?")  # trimmed value
_VERSION_RE = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CHUNK_EXT_RE = re.compile(
    rb'(?:[ \t]*;[ \t]*[' + _TCHAR + rb']+(?:[ \t]*=[ \t]*(?:[' + _TCHAR
    + rb']+|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)
_BAD_TARGET_RE = re.compile(rb"[\x00-\x20\x7f]")
_BAD_REASON_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = b"0123456789abcdefABCDEF"
_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)
_MAX_CHUNK_LINE = 4096  # chunk size plus extensions
_GROW = 2048  # a partial head longer than this grows in a bytearray (see _grow)

_CL, _TE, _CONN, _HOST, _UPGRADE, _EXPECT = range(6)
_FRAMING = {
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONN,
    b"host": _HOST,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
}


class _Parser:
    """What both parsers share: the buffer, limits, body and tunnel states.

    The buffer is `_buf[_pos:]`; `_scan` is where the next search for a head's end starts.
    `_step` is the current state (a module function taking the parser), `_after` the state
    that follows the current message.
    """

    __slots__ = (
        "_after", "_buf", "_eof", "_error", "_left", "_line_seen", "_pos", "_scan", "_seen",
        "_step", "max_body", "max_head", "max_headers", "max_line",
    )

    def __init__(self, head: Callable[[_Parser], Event], max_line: int, max_head: int,
                 max_headers: int, max_body: int | None) -> None:
        self.max_line = max_line
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_body = max_body
        self._buf = b""
        self._pos = 0
        self._scan = 0
        self._left = 0  # CL body: bytes to go; chunked: >0 data to go, 0 CRLF next, -1 size line next
        self._seen = 0  # chunked body bytes so far, for max_body
        self._eof = False
        self._line_seen = False  # the start line of the pending head is known to be complete
        self._error: HTTPError | None = None
        self._step: Callable[[_Parser], Event] = head
        self._after: Callable[[_Parser], Event] = head

    def feed(self, data: bytes) -> None:
        """Append received bytes (a bytes object: events slice it); parsing happens in `next_event`."""
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data
            self._scan = 0
            self._pos = 0
        elif buf.__class__ is bytearray:  # a long partial head or trailer block: see _grow
            buf += data
        else:
            self._buf = buf[pos:] + data
            self._scan = max(self._scan - pos, 0)
            self._pos = 0

    def feed_eof(self) -> None:
        """The peer closed its sending side: ends a close-delimited body, or is an error mid-message."""
        self._eof = True

    def next_event(self) -> Event:
        """The next event, or NEED_DATA / PAUSED / CLOSED; raises HTTPError on a bad message."""
        try:
            return self._step(self)
        except HTTPError as err:
            if self._error is None:
                self._error = self._fail(err)
                self._step = _failed
            raise self._error from None

    def _fail(self, err: HTTPError) -> HTTPError:
        return err

    @property
    def state(self) -> str:
        """IDLE, HEAD, BODY, PAUSED, TUNNEL, CLOSED or ERROR: what a timeout means now."""
        name = _STATE_NAMES.get(self._step, "BODY")
        if name == "IDLE" and self._pos < len(self._buf):
            return "HEAD"
        return name

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (e.g. pipelined requests, or while PAUSED)."""
        return len(self._buf) - self._pos


class RequestParser(_Parser):
    """Server side: parses the requests a client sends, pipelined or not.

    After a CONNECT request or an HTTP/1.1 Upgrade request (head, body, EndOfMessage) the
    parser pauses: `next_event` returns PAUSED and later bytes stay buffered (stop reading
    meanwhile) until the proxy knows the upstream's answer and calls `start_tunnel()`
    (101 / CONNECT 2xx: the rest is TunnelData) or `resume()` (refused: HTTP goes on).

    Limits: `max_line` for the request line (414), `max_head` for the whole head and
    `max_headers` for the number of fields (431), `max_body` for a body (413, None: unlimited).
    """

    __slots__ = ()

    def __init__(self, *, max_line: int = 8192, max_head: int = 65536, max_headers: int = 100,
                 max_body: int | None = None) -> None:
        super().__init__(_request_head, max_line, max_head, max_headers, max_body)

    def start_tunnel(self) -> None:
        """The upgrade/CONNECT succeeded: everything after the request is TunnelData."""
        if self._step is not _paused:
            raise RuntimeError("start_tunnel() needs a PAUSED parser")
        self._step = _tunnel

    def decline_upgrade(self) -> None:
        """The Upgrade request just parsed goes on as a plain one (h2c): no pause after it."""
        if self._after is _paused:
            self._after = _request_head

    def resume(self) -> None:
        """The upgrade/CONNECT was refused: parse the following bytes as requests again."""
        if self._step is not _paused:
            raise RuntimeError("resume() needs a PAUSED parser")
        self._step = self._after = _request_head
        self._scan = self._pos


class ResponseParser(_Parser):
    """Client side: parses an upstream's responses. Call `request_sent(method)` for every
    request forwarded on the connection (in order) so each response is matched with its
    method: HEAD responses have no body, a 2xx to CONNECT starts a tunnel, as does a 101.
    A response with no request pending is an error (502).

    EOF with nothing buffered returns CLOSED even when requests are pending (`pending` > 0):
    whether to retry or answer 502 is the proxy's choice. Every error's status is 502. A timer
    firing in state IDLE with `pending` > 0 means no response started: answer 504.
    """

    __slots__ = ("_methods",)

    def __init__(self, *, max_line: int = 8192, max_head: int = 65536, max_headers: int = 100,
                 max_body: int | None = None) -> None:
        super().__init__(_response_head, max_line, max_head, max_headers, max_body)
        self._methods: deque[bytes] = deque()

    def request_sent(self, method: bytes) -> None:
        """A request with this method went upstream; its response comes after the earlier ones."""
        self._methods.append(method)

    @property
    def pending(self) -> int:
        """Requests sent whose final response has not started yet."""
        return len(self._methods)

    def _fail(self, err: HTTPError) -> HTTPError:
        return HTTPError(502, f"bad upstream response: {err.reason}")


# --- states -------------------------------------------------------------------------------


def _split_head(p: _Parser) -> _Head | None:
    """Cut the next complete head off the buffer, or None if it is incomplete.

    Returns the start line, the fields (names lower-cased) and, from the same pass, the
    fields the framing and the proxy need: Content-Length, Transfer-Encoding, Connection
    tokens, Host, Upgrade and whether Expect is 100-continue.
    """
    buf = p._buf
    pos = p._pos
    end = buf.find(b"\r\n\r\n", p._scan)
    if end < 0:
        return None
    line_end = buf.find(b"\r\n", pos)
    if line_end == pos:  # RFC 9112 2.2: ignore empty lines before a start line
        while buf.startswith(b"\r\n", pos):
            pos += 2
        p._pos = p._scan = pos
        return _split_head(p)
    if line_end - pos > p.max_line:
        raise HTTPError(414, "start line too long")
    if end + 4 - pos > p.max_head:
        raise HTTPError(431, "header block too large")
    fields = _FIELD_RE.findall(buf, line_end + 1, end + 2)
    if len(fields) + 1 != buf.count(b"\n", pos, end + 2):
        raise HTTPError(400, _field_error(buf[pos:end + 2], line_end - pos))
    if len(fields) > p.max_headers:
        raise HTTPError(431, "too many header fields")
    p._pos = p._scan = end + 4
    p._line_seen = False
    headers = []
    append = headers.append
    get = _FRAMING.get
    cl = te = host = upgrade = None
    conn: tuple[bytes, ...] = ()
    expect = False
    for name, value in fields:
        name = name.lower()
        append((name, value))
        kind = get(name)
        if kind is None:
            continue
        if kind == _HOST:
            if host is not None:
                raise HTTPError(400, "more than one Host")
            host = value
        elif kind == _CONN:
            value = value.lower()
            conn += (value,) if value and b"," not in value else _tokens(value)
        elif kind == _CL:
            n = _content_length(value)
            if n < 0:
                raise HTTPError(400, "invalid Content-Length")
            if cl is not None:
                if n != cl:
                    raise HTTPError(400, "conflicting Content-Length values")
                headers.pop()  # a repeat: the first field carries the value
            elif not value.isdigit():
                headers[-1] = (name, b"%d" % n)  # "5, 5": the one value, as the head goes on
            cl = n
        elif kind == _TE:
            te = value if te is None else te + b"," + value
        elif kind == _UPGRADE:
            upgrade = value
        else:
            expect = value.lower() == b"100-continue"
    return buf[pos:line_end], headers, cl, te, conn, host, upgrade, expect


def _field_error(head: bytes, start: int) -> str:
    """Why a head's field lines (after `start`) failed `_FIELD_RE`: the slow path, for a reason."""
    if b"\n" in head[:start]:
        return "bare LF in start line"
    for line in head[start + 2:-2].split(b"\r\n"):
        if b"\n" in line or b"\r" in line:
            return "bare CR or LF in header block"
        if line[:1] in (b" ", b"\t"):
            return "obs-fold (line folding) is not allowed"
        name, colon, _ = line.partition(b":")
        if not colon:
            return "header line without a colon"
        if name != name.rstrip(b" \t"):
            return "whitespace before a header colon"
        if not TOKEN_RE.fullmatch(name):
            return "invalid header name"
        if not VALUE_RE.fullmatch(line[len(name) + 1:].strip(b" \t")):
            return "invalid character in header value"
    return "invalid header block"


def _head_incomplete(p: _Parser) -> Event:
    """No complete head buffered: enforce the limits early, and resume the search later."""
    buf = p._buf
    pos = p._pos
    n = len(buf)
    while buf.startswith(b"\r\n", pos):
        pos += 2
    p._pos = pos
    p._scan = max(pos, n - 3)
    if pos == n:
        if p._eof:
            p._step = _closed
            return CLOSED
        return NEED_DATA
    if p._eof:
        raise HTTPError(400, "connection closed in the middle of a head")
    if not p._line_seen:
        nl = buf.find(b"\n", pos, pos + p.max_line + 2)
        if nl < 0:
            if n - pos > p.max_line + 1:
                raise HTTPError(414, "start line too long")
        elif nl == pos or buf[nl - 1] != 13:
            raise HTTPError(400, "bare LF in start line")
        else:
            p._line_seen = True
    if n - pos > p.max_head:
        raise HTTPError(431, "header block too large")
    if n - pos > _GROW and buf.__class__ is bytes:
        _grow(p, pos)
        p._step = _long_head
    return NEED_DATA


def _grow(p: _Parser, pos: int) -> None:
    """Keep a long partial head (or trailer block) in a bytearray from now on, so that each
    feed appends in place instead of copying all that is buffered: a client sending a byte at
    a time would otherwise cost O(n^2)."""
    buf = bytearray(p._buf)
    del buf[:pos]
    p._buf = buf
    p._scan -= pos
    p._pos = 0


def _long_head(p: _Parser) -> Event:
    """The head state while the buffer is a bytearray: back to bytes once the head is complete."""
    if p._buf.find(b"\r\n\r\n", p._scan) < 0:
        return _head_incomplete(p)
    p._buf = bytes(p._buf)
    p._step = p._after
    return p._after(p)


def _tokens(value: bytes) -> tuple[bytes, ...]:
    """A comma-separated list, lower-cased, without empty elements."""
    value = value.lower()
    if b"," not in value:
        return (value,) if value else ()
    return tuple(t for t in (s.strip(b" \t") for s in value.split(b",")) if t)


def _content_length(value: bytes) -> int:
    """The Content-Length value, or -1; identical list members ("5, 5") count as one."""
    if not value.isdigit():
        members = {s.strip(b" \t") for s in value.split(b",")}
        if len(members) != 1:
            return -1
        value = members.pop()
        if not value.isdigit():
            return -1
    if len(value) > 18:
        return -1
    return int(value)


def _version(raw: bytes) -> bytes:
    """b"1.1" or b"1.0" for an HTTP-version that is not literally HTTP/1.1 or HTTP/1.0."""
    m = _VERSION_RE.fullmatch(raw)
    if m is None:
        raise HTTPError(400, "malformed HTTP version")
    if m[1] != b"1":
        raise HTTPError(505, f"HTTP version {raw.decode('latin-1')} not supported")
    return b"1.0" if m[2] == b"0" else b"1.1"  # a later 1.x is served as 1.1 (RFC 9110 2.5)


def _request_head(p: _Parser) -> Event:
    if p._pos == len(p._buf) and not p._eof:  # the usual state after a message: answer it cheaply
        return NEED_DATA
    split = _split_head(p)
    if split is None:
        return _head_incomplete(p)
    line, headers, cl, te, conn, host, upgrade, expect = split
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        version = b"1.1"
    elif version == b"HTTP/1.0":
        version = b"1.0"
    else:
        version = _version(version)
    if method not in _METHODS and TOKEN_RE.fullmatch(method) is None:
        raise HTTPError(400, "invalid method")
    if not target or _BAD_TARGET_RE.search(target):
        raise HTTPError(400, "invalid request target")
    if version == b"1.1":
        keep_alive = b"close" not in conn
        if host is None:
            raise HTTPError(400, "HTTP/1.1 request without Host")
        if upgrade is not None and b"upgrade" not in conn:
            upgrade = None  # RFC 9110 7.8: Upgrade counts only when Connection lists it
    else:
        keep_alive = b"keep-alive" in conn and b"close" not in conn
        upgrade = None
        expect = False  # RFC 9110 10.1.1: ignore 100-continue from HTTP/1.0
    chunked = False
    if te is not None:
        if version == b"1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        codings = _tokens(te)
        if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            raise HTTPError(400, "Transfer-Encoding must end with a single chunked")
        if len(codings) > 1:
            raise HTTPError(501, "transfer coding other than chunked")
        chunked = True
    if method == b"CONNECT":
        if chunked or cl:
            raise HTTPError(400, "CONNECT with a body")
        p._step = _eom
        p._after = _paused
    else:
        if chunked:
            p._step = _chunked
            p._left = -1
            p._seen = 0
        elif cl:
            if p.max_body is not None and cl > p.max_body:
                raise HTTPError(413, "body too large")
            p._step = _body_cl
            p._left = cl
        else:
            p._step = _eom
        p._after = _paused if upgrade is not None else _request_head if keep_alive else _closed
    return Request(method, target, version, headers, cl, chunked, keep_alive, host, upgrade, expect,
                   conn)


def _response_head(p: _Parser) -> Event:
    if p._pos == len(p._buf) and not p._eof:
        return NEED_DATA
    split = _split_head(p)
    if split is None:
        return _head_incomplete(p)
    methods: deque[bytes] = p._methods  # type: ignore[attr-defined]
    if not methods:
        raise HTTPError(502, "response without a request")
    line, headers, cl, te, conn, _host, upgrade, _expect = split
    version = line[:8]
    if version == b"HTTP/1.1":
        version = b"1.1"
    elif version == b"HTTP/1.0":
        version = b"1.0"
    else:
        version = _version(version)
    code = line[9:12]
    if (line[8:9] != b" " or not code.isdigit() or not b"100" <= code <= b"599"
            or line[12:13] not in (b" ", b"")):
        raise HTTPError(502, "malformed status line")
    status = int(code)
    reason = line[13:]
    if _BAD_REASON_RE.search(reason):
        raise HTTPError(502, "invalid reason phrase")
    keep_alive = b"close" not in conn if version == b"1.1" else (
        b"keep-alive" in conn and b"close" not in conn)
    if status < 200:
        if status != 101:
            return Response(status, reason, version, headers, cl, False, keep_alive, upgrade, conn)
        methods.popleft()
        p._step = _eom
        p._after = _tunnel
        return Response(status, reason, version, headers, cl, False, keep_alive, upgrade, conn)
    method = methods.popleft()
    chunked = False
    if method == b"CONNECT" and status < 300:
        p._step = _eom
        p._after = _tunnel
    elif method == b"HEAD" or status == 204 or status == 304:
        # no body: the framing fields describe the representation, not this message
        chunked = te is not None and _tokens(te)[-1:] == (b"chunked",)
        p._step = _eom
        p._after = _response_head if keep_alive else _closed
    else:
        if te is not None:
            if cl is not None:
                raise HTTPError(502, "both Content-Length and Transfer-Encoding")
            if version == b"1.0":
                raise HTTPError(502, "Transfer-Encoding in an HTTP/1.0 response")
            codings = _tokens(te)
            if not codings or b"chunked" in codings[:-1]:
                raise HTTPError(502, "invalid Transfer-Encoding")
            chunked = codings[-1] == b"chunked"
        if chunked:
            p._step = _chunked
            p._left = -1
            p._seen = 0
        elif cl is not None and te is None:
            if p.max_body is not None and cl > p.max_body:
                raise HTTPError(502, "body too large")
            p._step = _body_cl if cl else _eom
            p._left = cl
        else:  # RFC 9112 6.3: no length, or a last coding other than chunked: read until close
            p._step = _body_eof
            keep_alive = False
        p._after = _response_head if keep_alive else _closed
    return Response(status, reason, version, headers, cl, chunked, keep_alive, upgrade, conn)


def _body_cl(p: _Parser) -> Event:
    buf = p._buf
    pos = p._pos
    avail = len(buf) - pos
    if not avail:
        if p._eof:
            raise HTTPError(400, "connection closed in the middle of a body")
        return NEED_DATA
    left = p._left
    if avail <= left:
        data = buf[pos:] if pos else buf
        p._pos = len(buf)
        left -= avail
    else:
        data = buf[pos:pos + left]
        p._pos = pos + left
        left = 0
    p._left = left
    if not left:
        p._step = _eom
    return Data(data)


def _chunked(p: _Parser) -> Event:
    """Chunk sizes, data and CRLFs; every complete chunk already buffered goes into one Data."""
    buf = p._buf
    pos = p._pos
    n = len(buf)
    left = p._left
    pieces: list[bytes] = []
    try:
        while True:
            if left < 0:  # a chunk-size line
                eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE + 2)
                if eol < 0:
                    if n - pos >= _MAX_CHUNK_LINE + 2:
                        raise HTTPError(400, "chunk size line too long")
                    if buf.find(b"\n", pos, n) >= 0:  # no CRLF will end this line: fail now, not wait
                        raise HTTPError(400, "bare LF in chunk size line")
                    break
                line = buf[pos:eol]
                if 0 < len(line) < 16 and not line.translate(None, _HEX):
                    size = int(line, 16)
                else:
                    size = _chunk_size(line)
                if p.max_body is not None:
                    if p._seen + size > p.max_body:
                        raise HTTPError(413, "body too large")
                    p._seen += size
                pos = eol + 2
                if not size:
                    p._step = _trailers
                    p._scan = pos
                    left = 0
                    break
                left = size
            if left > 0:  # chunk data
                avail = n - pos
                if avail < left:
                    if avail:
                        pieces.append(buf[pos:] if pos else buf)
                        left -= avail
                        pos = n
                    break
                pieces.append(buf[pos:pos + left])
                pos += left
                left = 0
            if n - pos < 2:  # the CRLF after chunk data
                if n > pos and buf[pos] != 13:
                    raise HTTPError(400, "chunk data not followed by CRLF")
                break
            if buf[pos] != 13 or buf[pos + 1] != 10:
                raise HTTPError(400, "chunk data not followed by CRLF")
            pos += 2
            left = -1
    except HTTPError:
        if not pieces:
            raise
        # deliver the data before the error first (as a split feed would): the state still
        # points at the bad bytes, so the next call raises
    p._pos = pos
    p._left = left
    if pieces:
        return Data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
    if p._step is _trailers:
        return _trailers(p)
    if p._eof:
        raise HTTPError(400, "connection closed in the middle of a chunked body")
    return NEED_DATA


def _chunk_size(line: bytes) -> int:
    semi = line.find(b";")
    if semi >= 0:
        if _CHUNK_EXT_RE.fullmatch(line, semi) is None:
            raise HTTPError(400, "invalid chunk extension")
        line = line[:semi].rstrip(b" \t")
    if not line or len(line) > 15 or line.translate(None, _HEX):
        raise HTTPError(400, "invalid chunk size")
    return int(line, 16)


def _trailers(p: _Parser) -> Event:
    buf = p._buf
    pos = p._pos
    if buf.startswith(b"\r\n", pos):
        p._pos = p._scan = pos + 2
        p._step = p._after
        return _EOM
    end = buf.find(b"\r\n\r\n", p._scan)
    if end < 0:
        n = len(buf)
        if n - pos > p.max_head:
            raise HTTPError(431, "trailer block too large")
        if p._eof:
            raise HTTPError(400, "connection closed in the middle of trailers")
        p._scan = max(pos, n - 3)
        if n - pos > _GROW and buf.__class__ is bytes:
            _grow(p, pos)
        return NEED_DATA
    if buf.__class__ is bytearray:
        p._buf = bytes(buf)
    block = b"\n" + buf[pos:end + 2]
    fields = _FIELD_RE.findall(block)
    if len(fields) + 1 != block.count(b"\n"):
        raise HTTPError(400, "invalid trailer: " + _field_error(b"0\r" + block, 1))
    if len(fields) > p.max_headers:
        raise HTTPError(431, "too many trailer fields")
    p._pos = p._scan = end + 4
    p._step = p._after
    return EndOfMessage(tuple([(name.lower(), value) for name, value in fields]))


def _body_eof(p: _Parser) -> Event:
    """A response body delimited by the connection's close."""
    buf = p._buf
    pos = p._pos
    if pos < len(buf):
        p._pos = len(buf)
        return Data(buf[pos:] if pos else buf)
    if p._eof:
        return _eom(p)
    return NEED_DATA


def _eom(p: _Parser) -> Event:
    p._step = p._after
    p._scan = p._pos
    return _EOM


def _paused(p: _Parser) -> Event:
    return PAUSED


def _tunnel(p: _Parser) -> Event:
    buf = p._buf
    pos = p._pos
    if pos < len(buf):
        p._buf = b""
        p._pos = 0
        return TunnelData(buf[pos:] if pos else buf)
    if p._eof:
        p._step = _closed
        return CLOSED
    return NEED_DATA


def _closed(p: _Parser) -> Event:
    p._buf = b""  # whatever a peer sends after the last message is dropped
    p._pos = 0
    return CLOSED


def _failed(p: _Parser) -> Event:
    assert p._error is not None
    raise p._error


_STATE_NAMES: dict[Callable[[_Parser], Event], str] = {
    _request_head: "IDLE",
    _response_head: "IDLE",
    _long_head: "HEAD",
    _paused: "PAUSED",
    _tunnel: "TUNNEL",
    _closed: "CLOSED",
    _failed: "ERROR",
}
