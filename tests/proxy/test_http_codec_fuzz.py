"""Property tests for the HTTP/1.1 codec: any bytes, any split.

Whatever arrives, feeding and pulling must end in a sentinel or the codec's own HTTPError
(never another exception, never a loop that stops consuming), and any input, valid or not,
must give the same events and the same error however its bytes are split across feeds.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.proxy.http import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Data,
    EndOfMessage,
    HTTPError,
    Request,
    RequestParser,
    ResponseParser,
    TunnelData,
    chunk,
    last_chunk,
    request_head,
    response_head,
)

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                min_size=1, max_size=12).map(str.encode)
value = st.binary(max_size=20).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F))
body = st.binary(max_size=300)
FRAMING = (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect")


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """A valid request: (wire bytes, target, body)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"X-CUSTOM"]))
    target = b"/" + draw(value)
    extra = draw(st.lists(st.tuples(token, value), max_size=6))
    fields = [(b"Host", b"svc"), *((n, v) for n, v in extra if n.lower() not in FRAMING)]
    data = draw(body)
    if draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        pieces, rest = [], data
        for size in sizes:
            pieces.append(rest[:size])
            rest = rest[size:]
        pieces.append(rest)
        trailers = draw(st.lists(st.tuples(token, value), max_size=2))
        wire = request_head(method, target, [*fields, (b"Transfer-Encoding", b"chunked")])
        wire += b"".join(chunk(p) for p in pieces) + last_chunk(trailers)
    else:
        wire = request_head(method, target, [*fields, (b"Content-Length", b"%d" % len(data))]) + data
    return wire, target, data


def run(parser: RequestParser | ResponseParser, pieces: list[bytes], eof: bool,
        tunnel: bool = True) -> tuple[list[object], int | None]:
    """Feed the pieces, pulling every event; PAUSED is answered with start_tunnel() (or resume()).

    Returns the events (adjacent data merged) and the HTTPError status, if any. Every event
    must be paid for by fed bytes: more events than that would be a loop.
    """
    fed = 0
    events: list[object] = []
    try:
        for piece in [*pieces, None] if eof else pieces:
            if piece is None:
                parser.feed_eof()
            else:
                parser.feed(piece)
                fed += len(piece)
            while (ev := parser.next_event()) not in (NEED_DATA, CLOSED):
                if ev is PAUSED:
                    parser.start_tunnel() if tunnel else parser.resume()  # type: ignore[union-attr]
                elif isinstance(ev, Data | TunnelData) and events and type(events[-1]) is type(ev):
                    events[-1] = type(ev)(events[-1].data + ev.data)  # type: ignore[attr-defined]
                else:
                    events.append(ev)
                    assert len(events) <= 2 * fed + 4, "events without consuming input"
    except HTTPError as err:
        assert err.status in (400, 413, 414, 431, 501, 502, 505)
        assert parser.state == "ERROR"
        return events, err.status
    return events, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_random_bytes_into_a_request_parser(pieces: list[bytes], eof: bool) -> None:
    assert run(RequestParser(), pieces, eof) == run(RequestParser(), [b"".join(pieces)], eof)


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans(),
       st.lists(st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]), max_size=3))
def test_random_bytes_into_a_response_parser(pieces: list[bytes], eof: bool, methods: list[bytes]) -> None:
    def parser() -> ResponseParser:
        p = ResponseParser()
        for method in methods:
            p.request_sent(method)
        return p
    pieces = [b"HTTP/1.1 " + pieces[0], *pieces[1:]] if pieces else []
    assert run(parser(), pieces, eof) == run(parser(), [b"".join(pieces)], eof)


@SETTINGS
@given(st.lists(request(), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_requests_parse_the_same_whatever_the_split(reqs: list[tuple[bytes, bytes, bytes]],
                                                          cuts: list[int]) -> None:
    wire = b"".join(r[0] for r in reqs)
    whole, error = run(RequestParser(), [wire], eof=False)
    assert error is None
    heads = [ev for ev in whole if isinstance(ev, Request)]
    assert [h.target for h in heads] == [r[1] for r in reqs]
    bodies = [b""]
    for ev in whole:
        if isinstance(ev, Data):
            bodies[-1] += ev.data
        elif isinstance(ev, EndOfMessage):
            bodies.append(b"")
    assert bodies[:-1] == [r[2] for r in reqs]
    assert run(RequestParser(), split(wire, cuts), eof=False) == (whole, None)


@SETTINGS
@given(st.lists(request(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=8),
       st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), min_size=1, max_size=4))
def test_mutated_requests_only_raise_http_errors(reqs: list[tuple[bytes, bytes, bytes]], cuts: list[int],
                                                 edits: list[tuple[int, bytes]]) -> None:
    wire = bytearray(b"".join(r[0] for r in reqs))
    for at, new in edits:
        at %= len(wire) + 1
        wire[at:at + len(new) % 2] = new  # replace a byte or insert
    eof = bool(cuts and cuts[0] % 2)
    tunnel = len(wire) % 2 == 0
    result = run(RequestParser(), split(bytes(wire), cuts), eof, tunnel)
    assert result == run(RequestParser(), [bytes(wire)], eof, tunnel), "the split changed the result"


@SETTINGS
@given(st.integers(200, 599), body, st.booleans(), st.sampled_from([b"GET", b"HEAD", b"POST"]),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_serialized_responses_round_trip(status: int, data: bytes, chunked: bool, method: bytes,
                                         cuts: list[int]) -> None:
    no_body = method == b"HEAD" or status in (204, 304)
    if chunked:
        wire = response_head(status, [(b"transfer-encoding", b"chunked")])
        wire += b"" if no_body else chunk(data) + last_chunk()
    else:
        wire = response_head(status, [(b"content-length", b"%d" % len(data))]) + (b"" if no_body else data)
    parser = ResponseParser()
    parser.request_sent(method)
    events, error = run(parser, split(wire, cuts), eof=False)
    assert error is None
    assert events[0].status == status and events[0].chunked == chunked  # type: ignore[attr-defined]
    assert events[1:] == ([] if no_body or not data else [Data(data)]) + [EndOfMessage()]
