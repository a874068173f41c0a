"""The sidecar's HTTP/1.1 codec, without sockets: framing, limits, smuggling defences, serializers."""

from __future__ import annotations

import time

import pytest

from dataplane.proxy.http import (
    CLOSED,
    CONTINUE,
    LAST_CHUNK,
    NEED_DATA,
    PAUSED,
    Data,
    EndOfMessage,
    HTTPError,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    TunnelData,
    chunk,
    error_response,
    last_chunk,
    request_head,
    response_head,
    valid_field,
)
from dataplane.proxy.http.codec import Event

SENTINELS = (NEED_DATA, PAUSED, CLOSED)
GET = b"GET /plaintext HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"


def pull(parser: RequestParser | ResponseParser, data: bytes = b"", eof: bool = False) -> list[Event]:
    """Feed, then pull events up to and including the first sentinel."""
    if data:
        parser.feed(data)
    if eof:
        parser.feed_eof()
    out: list[Event] = []
    while True:
        ev = parser.next_event()
        out.append(ev)
        if ev in SENTINELS:
            return out


def merged(events: list[Event]) -> list[object]:
    """Adjacent Data / TunnelData merged, so tests do not depend on how bytes were split."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, Data | TunnelData) and out and type(out[-1]) is type(ev):
            out[-1] = type(ev)(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def byte_by_byte(parser: RequestParser | ResponseParser, data: bytes, eof: bool = False) -> list[object]:
    events: list[Event] = []
    for i in range(len(data)):
        events += [ev for ev in pull(parser, data[i:i + 1]) if ev is not NEED_DATA]
    if eof:
        events += [ev for ev in pull(parser, eof=True) if ev is not NEED_DATA]
    return merged(events)


def body(events: list[Event]) -> bytes:
    return b"".join(ev.data for ev in events if isinstance(ev, Data))


def refused(data: bytes, parser: RequestParser | ResponseParser | None = None,
            eof: bool = False) -> HTTPError:
    parser = parser or RequestParser()
    with pytest.raises(HTTPError) as info:
        pull(parser, data, eof)
    return info.value


def responses(*methods: bytes) -> ResponseParser:
    parser = ResponseParser()
    for method in methods:
        parser.request_sent(method)
    return parser


# --- requests --------------------------------------------------------------------------------


def test_simple_get_gives_head_end_and_need_data() -> None:
    p = RequestParser()
    assert p.state == "IDLE"
    req, end, more = pull(p, GET)
    assert isinstance(req, Request)
    assert (req.method, req.target, req.version) == (b"GET", b"/plaintext", b"1.1")
    assert req.headers == [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    assert req.host == b"127.0.0.1:8080"
    assert req.keep_alive and not req.chunked and not req.expect_continue
    assert req.content_length is None and req.upgrade is None and req.connection == ()
    assert end == EndOfMessage() and more is NEED_DATA
    assert p.state == "IDLE" and p.buffered == 0


def test_field_whitespace_is_trimmed_and_names_lower_cased() -> None:
    [req, *_] = pull(RequestParser(), b"GET / HTTP/1.1\r\nHOST:a\r\nX-Pad:  \t v a l \t \r\n"
                                      b"X-Empty:\r\nX-Blank: \t \r\nConTent-LENGTH: 2\r\n\r\nok")
    assert req.headers == [(b"host", b"a"), (b"x-pad", b"v a l"), (b"x-empty", b""), (b"x-blank", b""),
                           (b"content-length", b"2")]
    assert req.content_length == 2


def test_obs_text_in_a_value_is_kept() -> None:
    [req, *_] = pull(RequestParser(), b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9 \xff\r\n\r\n")
    assert req.headers[1] == (b"x-name", b"caf\xe9 \xff")


def test_content_length_body_fed_byte_by_byte_then_next_request() -> None:
    post = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
    events = byte_by_byte(RequestParser(), post + GET)
    assert [type(ev) for ev in events] == [Request, Data, EndOfMessage, Request, EndOfMessage]
    assert events[0].content_length == 11 and events[1] == Data(b"hello world")
    assert events[3].target == b"/plaintext"


def test_body_arrives_in_pieces_and_state_is_body() -> None:
    p = RequestParser()
    events = pull(p, b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
    assert events[1:] == [Data(b"ab"), NEED_DATA]
    assert p.state == "BODY"
    assert pull(p, b"cdefGET") == [Data(b"cdef"), EndOfMessage(), NEED_DATA]
    assert p.state == "HEAD" and p.buffered == 3


def test_chunked_body_with_extensions_and_trailers() -> None:
    msg = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n"
           b"1 ; a = \"q;\\\"uo\\\\ted\" ;flag\r\n \r\n"
           b"A\r\n0123456789\r\n"
           b"0;last\r\nX-Checksum: abc\r\nX-Other:  o \r\n\r\n")
    p = RequestParser()
    events = pull(p, msg)
    req = events[0]
    assert req.chunked and req.content_length is None
    assert body(events) == b"hello 0123456789"
    assert events[-2] == EndOfMessage(((b"x-checksum", b"abc"), (b"x-other", b"o")))
    assert events[-1] is NEED_DATA
    assert merged(byte_by_byte(RequestParser(), msg)) == merged(events[:-1])


def test_complete_chunks_in_one_buffer_come_out_as_one_data() -> None:
    events = pull(RequestParser(), b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    assert events[1:] == [Data(b"abcdef"), EndOfMessage(), NEED_DATA]


@pytest.mark.parametrize("size_line", [
    b"zz", b"5 x", b"-5", b"+5", b"0x5", b"", b" 5", b"5_0", b"1" * 16, b"5;", b"5;=x", b"5;a=\"open",
    b"5;a b", b"5\x00",
])
def test_chunk_size_garbage_is_400(size_line: bytes) -> None:
    err = refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line
                  + b"\r\nhello\r\n0\r\n\r\n")
    assert err.status == 400


@pytest.mark.parametrize("tail", [b"5\r\nhelloXX\r\n0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n",
                                  b"0\r\nBad Trailer: x\r\n\r\n", b"0\r\nX: a\rb\r\n\r\n"])
def test_chunk_framing_errors_are_400(tail: bytes) -> None:
    err = refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
    assert err.status == 400


def test_data_before_a_chunk_error_comes_out_first_however_split() -> None:
    msg = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
    p = RequestParser()
    p.feed(msg)
    assert [p.next_event().__class__, p.next_event()] == [Request, Data(b"abc")]
    with pytest.raises(HTTPError, match="chunk size"):
        p.next_event()
    p = RequestParser()
    assert pull(p, msg[:-6])[1:] == [Data(b"abc"), NEED_DATA]
    assert refused(msg[-6:], p).status == 400


def test_chunk_size_line_too_long_is_400() -> None:
    err = refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"a" * 5000)
    assert err.status == 400 and "too long" in err.reason


def test_pipelined_requests_come_out_in_order_and_lazily() -> None:
    batch = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
             b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
             b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
             b"\r\nGET /4 HTTP/1.1\r\nHost: a\r\n\r\n")
    p = RequestParser()
    p.feed(batch)
    first = p.next_event()
    assert first.target == b"/1" and p.next_event() == EndOfMessage()
    assert p.buffered == len(batch) - len(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    rest = pull(p)
    assert [ev.target for ev in rest if isinstance(ev, Request)] == [b"/2", b"/3", b"/4"]
    assert [ev.data for ev in rest if isinstance(ev, Data)] == [b"body", b"hi"]
    assert rest[-1] is NEED_DATA and p.state == "IDLE"


def test_body_holding_crlfcrlf_is_not_mistaken_for_a_head_end() -> None:
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n\r\n\r\nX: y"
    events = byte_by_byte(RequestParser(), post + GET)
    assert events[1] == Data(b"\r\n\r\nX: y") and events[3].target == b"/plaintext"


def test_http10_defaults_to_close_and_drops_what_follows() -> None:
    p = RequestParser()
    events = pull(p, b"GET / HTTP/1.0\r\n\r\n" + GET)
    assert events[0].version == b"1.0" and not events[0].keep_alive and events[0].host is None
    assert events[1:] == [EndOfMessage(), CLOSED]
    assert p.state == "CLOSED" and pull(p, GET) == [CLOSED] and p.buffered == 0


def test_http10_keep_alive_keeps_the_connection() -> None:
    events = pull(RequestParser(), b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n" + GET)
    assert events[0].keep_alive and events[0].connection == (b"keep-alive",)
    assert events[2].target == b"/plaintext"


def test_connection_close_in_http11() -> None:
    events = pull(RequestParser(), b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade-Me, close\r\n\r\n"
                                   + GET)
    assert not events[0].keep_alive and events[0].connection == (b"upgrade-me", b"close")
    assert events[1:] == [EndOfMessage(), CLOSED]


def test_later_http1_minor_versions_are_served_as_11() -> None:
    [req, *_] = pull(RequestParser(), b"GET / HTTP/1.7\r\nHost: a\r\n\r\n")
    assert req.version == b"1.1" and req.keep_alive


def test_expect_100_continue_is_surfaced() -> None:
    p = RequestParser()
    events = pull(p, b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
    assert events[0].expect_continue and events[1:] == [NEED_DATA] and p.state == "BODY"
    assert pull(p, b"abc") == [Data(b"abc"), EndOfMessage(), NEED_DATA]
    [old, *_] = pull(RequestParser(), b"PUT /f HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
    assert not old.expect_continue


def test_upgrade_pauses_then_tunnels() -> None:
    p = RequestParser()
    events = pull(p, b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                     b"\x81\x05hello")
    assert events[0].upgrade == b"websocket" and events[1:] == [EndOfMessage(), PAUSED]
    assert p.state == "PAUSED" and pull(p, b"\x81") == [PAUSED] and p.buffered == 8
    p.start_tunnel()
    assert pull(p) == [TunnelData(b"\x81\x05hello\x81"), NEED_DATA]
    assert p.state == "TUNNEL"
    assert pull(p, b"GET / HTTP/1.1\r\n\r\n") == [TunnelData(b"GET / HTTP/1.1\r\n\r\n"), NEED_DATA]
    assert pull(p, eof=True) == [CLOSED]


def test_refused_upgrade_resumes_http() -> None:
    p = RequestParser()
    events = pull(p, b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n" + GET)
    assert events[-1] is PAUSED
    p.resume()
    assert [type(ev) for ev in pull(p)] == [Request, EndOfMessage, type(NEED_DATA)]


def test_upgrade_without_connection_upgrade_is_ignored() -> None:
    events = pull(RequestParser(), b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert events[0].upgrade is None and events[-1] is NEED_DATA


def test_connect_pauses_then_tunnels() -> None:
    p = RequestParser()
    events = pull(p, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    assert events[0].method == b"CONNECT" and events[0].target == b"example.com:443"
    assert events[1:] == [EndOfMessage(), PAUSED]
    with pytest.raises(RuntimeError):
        RequestParser().start_tunnel()
    p.start_tunnel()
    assert pull(p) == [TunnelData(b"\x16\x03\x01"), NEED_DATA]


def test_connect_with_a_body_is_refused() -> None:
    err = refused(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert err.status == 400


def test_leading_empty_lines_are_ignored() -> None:
    events = pull(RequestParser(), b"\r\n\r\n" + GET)
    assert events[0].target == b"/plaintext"
    assert byte_by_byte(RequestParser(), b"\r\n\r\n\r\n" + GET)[0].target == b"/plaintext"


def test_head_fed_byte_by_byte_is_linear() -> None:
    req = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 60000 + b"\r\n\r\n"
    start = time.process_time()
    events = byte_by_byte(RequestParser(), req)
    assert time.process_time() - start < 5
    assert events[0].headers[1] == (b"x-big", b"v" * 60000) and type(events[0].headers[1][1]) is bytes
    p = RequestParser()
    pull(p, req[:5000])
    assert p.state == "HEAD"
    assert pull(p, req[5000:])[0].headers == events[0].headers


def test_whitespace_runs_in_a_value_do_not_backtrack() -> None:
    start = time.process_time()
    [req, *_] = pull(RequestParser(), b"GET / HTTP/1.1\r\nHost: a\r\nX: a" + b" " * 50000 + b"b \t\r\n\r\n")
    assert time.process_time() - start < 1
    assert req.headers[1][1] == b"a" + b" " * 50000 + b"b"


# --- request errors -----------------------------------------------------------------------


def test_request_line_too_long_is_414_complete_or_not() -> None:
    long_target = b"/" + b"a" * 9000
    assert refused(b"GET " + long_target + b" HTTP/1.1\r\nHost: a\r\n\r\n").status == 414
    assert refused(b"GET " + long_target).status == 414
    small = RequestParser(max_line=100)
    assert refused(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n", small).status == 414


def test_header_block_too_large_is_431() -> None:
    p = RequestParser(max_head=1024)
    assert pull(p, b"GET / HTTP/1.1\r\nHost: a\r\n") == [NEED_DATA] and p.state == "HEAD"
    assert refused(b"X-Fill: " + b"x" * 1100, p).status == 431
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 2000 + b"\r\n\r\n",
                   RequestParser(max_head=1024)).status == 431
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    assert refused(many).status == 431


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET /\r\nHost: a\r\n\r\n", "request line"),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
    (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "request line"),
    (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "method"),
    (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", "target"),
    (b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n", "target"),
    (b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", "target"),
    (b"GET / HTTP/1.1\nHost: a\n\n", "bare LF"),
    (b"GET /\nX: y HTTP/1.1\r\nHost: a\r\n\r\n", "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", "header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad(Name: x\r\n\r\n", "header name"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "whitespace before"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tfolded\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", "colon"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", "header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", "value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", "CR"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nY: b\r\n\r\n", "LF"),
    (b"GET / HTTP/1.1\r\n\r\n", "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
    (b"GET / HTTP/1\r\nHost: a\r\n\r\n", "version"),
    (b"GET / http/1.1\r\nHost: a\r\n\r\n", "version"),
    (b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", "version"),
    (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", "version"),
])
def test_bad_syntax_is_400(data: bytes, reason: str) -> None:
    err = refused(data)
    assert err.status == 400
    assert reason.lower() in err.reason.lower()


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"])
def test_unsupported_version_is_505(version: bytes) -> None:
    assert refused(b"GET / " + version + b"\r\nHost: a\r\n\r\n").status == 505


@pytest.mark.parametrize(("fields", "status"), [
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    (b"Content-Length: 5, 6\r\n", 400),
    (b"Transfer-Encoding: chunked, gzip\r\n", 400),
    (b"Transfer-Encoding: gzip\r\n", 400),
    (b"Transfer-Encoding: chunked, chunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
    (b"Transfer-Encoding:\r\n", 400),
    (b"Transfer-Encoding : chunked\r\n", 400),
    (b"Transfer-Encoding: \x0bchunked\r\n", 400),
    (b"Content-Length: abc\r\n", 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: +5\r\n", 400),
    (b"Content-Length: 0x10\r\n", 400),
    (b"Content-Length: 1 2\r\n", 400),
    (b"Content-Length:\r\n", 400),
    (b"Content-Length: 1_0\r\n", 400),
    (b"Content-Length: " + b"9" * 19 + b"\r\n", 400),
])
def test_smuggling_shapes_are_refused(fields: bytes, status: int) -> None:
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\nhello").status == status


def test_transfer_encoding_in_http10_is_refused() -> None:
    assert refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").status == 400


@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n", b"Content-Length: 5, 5\r\n", b"content-length: 005\r\n",
])
def test_identical_content_lengths_are_one(fields: bytes) -> None:
    events = pull(RequestParser(), b"POST / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\nhello")
    assert events[0].content_length == 5 and events[1] == Data(b"hello")


def test_transfer_encoding_names_are_case_insensitive() -> None:
    events = pull(RequestParser(), b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\n"
                                   b"1\r\nx\r\n0\r\n\r\n")
    assert events[0].chunked and body(events) == b"x"


def test_body_limit_is_413() -> None:
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n",
                   RequestParser(max_body=10)).status == 413
    p = RequestParser(max_body=10)
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n"
    assert body(pull(p, chunked)) == b"12345678"
    assert refused(b"8\r\n", p).status == 413


def test_errors_are_sticky() -> None:
    p = RequestParser()
    first = refused(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", p)
    assert p.state == "ERROR"
    assert refused(GET, p) is first
    r = responses(b"GET")
    bad = refused(b"HTTP/1.1 2OO OK\r\n\r\n", r)
    assert refused(b"", r) is bad and bad.reason == "bad upstream response: malformed status line"


def test_long_trailers_fed_byte_by_byte() -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(40))
    msg = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
           + trailers + b"\r\n" + GET)
    events = byte_by_byte(RequestParser(), msg)
    assert events[1] == Data(b"abc") and len(events[2].trailers) == 40
    assert events[2].trailers[39] == (b"x-t39", b"v" * 100) and type(events[2].trailers[0][1]) is bytes
    assert events[3].target == b"/plaintext" and type(events[3].headers[0][1]) is bytes


def test_eof_cases() -> None:
    assert pull(RequestParser(), eof=True) == [CLOSED]
    p = RequestParser()
    pull(p, GET)
    assert pull(p, eof=True) == [CLOSED] and p.state == "CLOSED"
    assert refused(b"GET / HT", eof=True).status == 400
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", eof=True).status == 400
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                   eof=True).status == 400


def test_state_tells_a_timer_what_it_interrupts() -> None:
    p = RequestParser()
    assert p.state == "IDLE"
    pull(p, b"GET / HT")
    assert p.state == "HEAD"
    pull(p, b"TP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    assert p.state == "BODY"
    pull(p, b"ok")
    assert p.state == "IDLE"


# --- responses ------------------------------------------------------------------------------


def test_simple_response_then_a_pipelined_one() -> None:
    p = responses(b"GET", b"GET")
    events = pull(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
                     b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    first, data, end, second, end2, more = events
    assert isinstance(first, Response)
    assert (first.status, first.reason, first.version, first.content_length) == (200, b"OK", b"1.1", 5)
    assert first.headers == [(b"content-length", b"5"), (b"server", b"x")] and first.keep_alive
    assert data == Data(b"hello") and end == end2 == EndOfMessage()
    assert (second.status, second.reason) == (404, b"Not Found") and more is NEED_DATA
    assert p.pending == 0


def test_head_response_has_no_body() -> None:
    p = responses(b"HEAD", b"GET")
    events = pull(p, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert events[0].content_length == 1000 and events[1] == EndOfMessage()
    assert events[2].status == 200 and events[3] == Data(b"ok")


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    p = responses(b"GET", b"GET")
    events = pull(p, b"HTTP/1.1 %d X\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n" % status
                  if status == 304 else b"HTTP/1.1 204 No Content\r\n\r\n")
    assert events[0].status == status and events[1:] == [EndOfMessage(), NEED_DATA]


def test_informational_responses_come_before_the_final_one() -> None:
    p = responses(b"POST")
    events = pull(p, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert [ev.status for ev in events if isinstance(ev, Response)] == [100, 103, 201]
    assert events[1].headers == [(b"link", b"</s.css>")]
    assert events[3:] == [Data(b"ok"), EndOfMessage(), NEED_DATA] and p.pending == 0


def test_close_delimited_response_ends_at_eof() -> None:
    p = responses(b"GET")
    events = byte_by_byte(p, b"HTTP/1.1 200 OK\r\nServer: old\r\n\r\nall of it", eof=True)
    assert not events[0].keep_alive and events[1:] == [Data(b"all of it"), EndOfMessage(), CLOSED]


def test_response_with_unknown_coding_last_is_close_delimited() -> None:
    p = responses(b"GET")
    events = pull(p, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz", eof=True)
    assert not events[0].chunked and not events[0].keep_alive
    assert events[1:] == [Data(b"zzz"), EndOfMessage(), CLOSED]


def test_http10_response_closes_unless_keep_alive() -> None:
    p = responses(b"GET", b"GET")
    events = pull(p, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na"
                     b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb")
    assert events[0].keep_alive and not events[3].keep_alive and events[-1] is CLOSED


def test_chunked_response_with_trailers() -> None:
    msg = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n")
    events = byte_by_byte(responses(b"GET"), msg)
    assert events[0].chunked and events[1] == Data(b"wikipedia")
    assert events[2] == EndOfMessage(((b"x-t", b"1"),))


def test_101_switches_to_a_tunnel() -> None:
    p = responses(b"GET")
    events = pull(p, b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                     b"\x81\x02hi")
    assert events[0].status == 101 and events[0].upgrade == b"websocket"
    assert events[1:] == [EndOfMessage(), TunnelData(b"\x81\x02hi"), NEED_DATA] and p.state == "TUNNEL"


def test_connect_2xx_tunnels_and_refusal_does_not() -> None:
    p = responses(b"CONNECT")
    assert pull(p, b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03")[1:] == [
        EndOfMessage(), TunnelData(b"\x16\x03"), NEED_DATA]
    p = responses(b"CONNECT")
    events = pull(p, b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 2\r\n\r\nno")
    assert events[1:] == [Data(b"no"), EndOfMessage(), NEED_DATA]


def test_eof_with_a_request_pending_is_closed_not_an_error() -> None:
    p = responses(b"GET")
    assert pull(p, eof=True) == [CLOSED] and p.pending == 1


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 600 Odd\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\n\r\n",
    b"HTTP/1.1 200OK\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
])
def test_bad_responses_are_502(data: bytes) -> None:
    err = refused(data, responses(b"GET"))
    assert err.status == 502 and err.reason.startswith("bad upstream response")


def test_response_without_a_request_is_502() -> None:
    assert refused(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", ResponseParser()).status == 502


def test_response_errors_mid_body_and_limits_are_502() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"
    assert refused(cut, responses(b"GET"), eof=True).status == 502
    p = ResponseParser(max_head=256)
    p.request_sent(b"GET")
    assert refused(b"HTTP/1.1 200 OK\r\nX: " + b"x" * 300, p).status == 502


# --- serialization -----------------------------------------------------------------------------


def test_request_head_round_trips() -> None:
    wire = request_head(b"GET", b"/a?b=c", [(b"host", b"svc"), (b"x-request-id", b"42")])
    assert wire == b"GET /a?b=c HTTP/1.1\r\nhost: svc\r\nx-request-id: 42\r\n\r\n"
    [req, *_] = pull(RequestParser(), wire)
    assert req.headers == [(b"host", b"svc"), (b"x-request-id", b"42")]
    assert request_head(b"GET", b"/", [], version=b"1.0") == b"GET / HTTP/1.0\r\n\r\n"


def test_response_head_reasons() -> None:
    assert response_head(200, [(b"content-length", b"0")]) == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert response_head(404, [], reason=b"Gone Fishing") == b"HTTP/1.1 404 Gone Fishing\r\n\r\n"
    assert response_head(299, []) == b"HTTP/1.1 299 \r\n\r\n"
    p = responses(b"GET", b"GET")
    events = pull(p, response_head(299, [(b"content-length", b"0")]) + response_head(200, [], version=b"1.0"))
    assert (events[0].status, events[0].reason) == (299, b"")
    assert events[2].version == b"1.0" and not events[2].keep_alive


def test_chunked_serialization_round_trips() -> None:
    wire = (response_head(200, [(b"transfer-encoding", b"chunked")]) + chunk(b"a" * 300) + chunk(b"")
            + chunk(b"bc") + last_chunk([(b"x-sum", b"7")]))
    assert chunk(b"") == b"" and chunk(b"xyz") == b"3\r\nxyz\r\n" and last_chunk() == LAST_CHUNK
    events = pull(responses(b"GET"), wire)
    assert body(events) == b"a" * 300 + b"bc" and events[-2] == EndOfMessage(((b"x-sum", b"7"),))


@pytest.mark.parametrize("status", [400, 408, 413, 414, 431, 501, 502, 503, 504, 505])
def test_error_responses_parse_and_close(status: int) -> None:
    wire = error_response(status)
    events = pull(responses(b"GET"), wire)
    head = events[0]
    assert head.status == status and not head.keep_alive and head.connection == (b"close",)
    assert head.content_length == len(body(events)) and events[-1] is CLOSED
    assert body(events).decode().startswith(head.reason.decode())


def test_error_response_detail() -> None:
    wire = error_response(400, "invalid header name")
    assert wire.endswith(b"\r\n\r\nBad Request: invalid header name\n")


def test_continue_constant() -> None:
    p = responses(b"POST")
    assert pull(p, CONTINUE)[0].status == 100 and p.pending == 1


def test_valid_field() -> None:
    assert valid_field(b"x-request-id", b"abc 123")
    assert valid_field(b"x-empty", b"")
    assert not valid_field(b"x bad", b"v")
    assert not valid_field(b"x", b"a\r\nInjected: 1")
    assert not valid_field(b"x", b" padded")
    assert not valid_field(b"", b"v")
