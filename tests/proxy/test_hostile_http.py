"""Hostile HTTP/1.1 through the sidecar, with HAProxy and nginx as reference peers (issue 12, items
1, 3 and the HTTP parts of 11).

Every vector goes as the same raw bytes to zmesh (the real HttpConnection on real sockets), HAProxy
and nginx, each in front of the same upstream. The test asserts what zmesh does; the peers' outcome
is recorded in a table printed at the end of the module (`pytest -s`). The sans-IO pieces
(pathnorm, target, hopbyhop, the codec's Content-Length) are tested over tables first.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dataplane.proxy.http import hopbyhop, pathnorm
from dataplane.proxy.http.codec import (
    Data,
    EndOfMessage,
    HTTPError,
    Request,
    RequestParser,
    Response,
    ResponseParser,
)
from dataplane.proxy.http.pathnorm import BASE, DECODE_AND_MERGE_SLASHES, MERGE_SLASHES, NONE, PathError
from dataplane.proxy.http.target import normalize_request
from dataplane.proxy.runtime import ConfigError, compile_snapshot
from tests.proxy.l7helpers import CLUSTER, Backend, Proxy, Seen, endpoint, make_config, route
from tests.proxy.reference_peers import Outcome, RecordingBackend, exchange, haproxy, nginx
from tests.proxy.reference_peers import Seen as RecordedRequest
from tests.proxy.test_authz_proxy import deny, inbound_config, op

# --- path normalisation (pathnorm.py) ----------------------------------------------------------------

_PATHS = [  # path, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES
    ("/a/../admin", "/admin", "/admin", "/admin"),
    ("/./admin", "/admin", "/admin", "/admin"),
    ("//admin", "//admin", "/admin", "/admin"),
    ("/%61dmin", "/admin", "/admin", "/admin"),
    ("/%2e%2e/admin", "/admin", "/admin", "/admin"),
    ("/admin%2f..", "/admin%2F..", "/admin%2F..", "/"),
    ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%5cb", "/a%5Cb", "/a%5Cb", "/a/b"),
    ("/\\admin", "//admin", "/admin", "/admin"),
    ("/a\\..\\admin", "/admin", "/admin", "/admin"),
    ("/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin"),  # decoded once
    ("/a/b/..", "/a/", "/a/", "/a/"),
    ("/../../a", "/a", "/a", "/a"),
    ("/a/.", "/a/", "/a/", "/a/"),
    ("/a//b/../c", "/a//c", "/a/c", "/a/c"),
    ("/.hidden/x", "/.hidden/x", "/.hidden/x", "/.hidden/x"),
    ("/%7euser/%41", "/~user/A", "/~user/A", "/~user/A"),
    ("/", "/", "/", "/"),
]


@pytest.mark.parametrize(("path", "base", "merge", "decode"), _PATHS, ids=[p[0] for p in _PATHS])
def test_path_normalisation_modes(path: str, base: str, merge: str, decode: str) -> None:
    raw = path.encode()
    assert pathnorm.normalize(raw, NONE) == raw
    assert pathnorm.normalize(raw, BASE).decode() == base
    assert pathnorm.normalize(raw, MERGE_SLASHES).decode() == merge
    assert pathnorm.normalize(raw, DECODE_AND_MERGE_SLASHES).decode() == decode
    for mode in (BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES):  # normalising twice changes nothing more
        once = pathnorm.normalize(raw, mode)
        assert pathnorm.normalize(once, mode) == once


@pytest.mark.parametrize("path", ["/a%00b", "/a%zz", "/a%4", "/a%"])
def test_bad_escapes_are_refused(path: str) -> None:
    for mode in (BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES):
        with pytest.raises(PathError):
            pathnorm.normalize(path.encode(), mode)
    if "%00" in path:  # refused whatever the mode, as Istio does
        with pytest.raises(PathError):
            pathnorm.normalize(path.encode(), NONE)
    else:
        assert pathnorm.normalize(path.encode(), NONE) == path.encode()


# --- request targets (target.py) -----------------------------------------------------------------------


def _request(line: bytes, host: bytes | None = b"web") -> Request:
    parser = RequestParser()
    parser.feed(line + b"\r\n" + (b"Host: " + host + b"\r\n" if host is not None else b"") + b"\r\n")
    ev = parser.next_event()
    assert isinstance(ev, Request)
    return ev


_TARGETS = [  # request line, target forwarded, Host forwarded
    (b"GET /a/./b?x=/../y HTTP/1.1", b"/a/b?x=/../y", b"web"),  # the query goes on as received
    (b"GET http://web/admin HTTP/1.1", b"/admin", b"web"),
    (b"GET HTTP://Other.Example:8080 HTTP/1.1", b"/", b"Other.Example:8080"),
    (b"GET http://other.example?q=1 HTTP/1.1", b"/?q=1", b"other.example"),
    (b"GET http://[::1]:80/%61 HTTP/1.1", b"/a", b"[::1]:80"),
    (b"OPTIONS * HTTP/1.1", b"*", b"web"),
    (b"CONNECT web:443 HTTP/1.1", b"web:443", b"web"),
]


@pytest.mark.parametrize(("line", "target", "host"), _TARGETS, ids=[t[0].decode() for t in _TARGETS])
def test_targets_come_out_in_origin_form_with_the_target_authority(line: bytes, target: bytes,
                                                                   host: bytes) -> None:
    req = _request(line)
    normalize_request(req, BASE)
    assert (req.target, req.host) == (target, host)
    assert [v for n, v in req.headers if n == b"host"] == [host]


@pytest.mark.parametrize("line", [b"GET https://web/x HTTP/1.1", b"GET ftp://web/x HTTP/1.1",
                                  b"GET http://u:p@web/x HTTP/1.1", b"GET http:///x HTTP/1.1",
                                  b"GET http://we<b/x HTTP/1.1", b"GET * HTTP/1.1", b"GET web:80 HTTP/1.1",
                                  b"GET admin HTTP/1.1", b"GET \\admin HTTP/1.1", b"GET /x#frag HTTP/1.1",
                                  b"GET http://web/x#frag HTTP/1.1", b"GET /a%00 HTTP/1.1"])
def test_bad_targets_are_400(line: bytes) -> None:
    with pytest.raises(HTTPError) as err:
        normalize_request(_request(line), BASE)
    assert err.value.status == 400


def test_the_proxy_config_carries_the_normalisation_and_refuses_an_unknown_one() -> None:
    cfg = make_config()
    assert compile_snapshot(cfg).path_normalization == BASE  # Istio's default
    cfg["security"] = {"path_normalization": MERGE_SLASHES}
    assert compile_snapshot(cfg).path_normalization == MERGE_SLASHES
    cfg["security"] = {"path_normalization": "DEFAULT"}
    with pytest.raises(ConfigError, match="path_normalization"):
        compile_snapshot(cfg)


# --- hop-by-hop fields, trailers, Content-Length (hopbyhop.py, codec) ------------------------------------


def test_a_nomination_never_drops_framing_or_host() -> None:
    tokens = (b"close", b"content-length", b"transfer-encoding", b"host", b"x-hop")
    assert hopbyhop.nominates(tokens) and not hopbyhop.nominates((b"close", b"keep-alive"))
    drop = hopbyhop.drop_set(hopbyhop.REQUEST_DROP, tokens)
    assert b"x-hop" in drop and b"connection" in drop
    assert not drop & {b"content-length", b"host", b"x-request-id"}
    assert b"transfer-encoding" in drop  # always: the proxy redoes chunked framing itself


def test_trailers_lose_framing_routing_and_nominated_fields() -> None:
    fields = [(b"host", b"evil"), (b"content-length", b"99"), (b"transfer-encoding", b"chunked"),
              (b"te", b"trailers"), (b"trailer", b"x"), (b"authorization", b"a"), (b"x-hop", b"1"),
              (b"x-checksum", b"c"), (b"grpc-status", b"0")]
    assert hopbyhop.trailers(fields, (b"x-hop",)) == [(b"x-checksum", b"c"), (b"grpc-status", b"0")]


@pytest.mark.parametrize("fields", [b"Content-Length: 5, 5\r\n",
                                    b"Content-Length: 5\r\nContent-Length: 5\r\n",
                                    b"Content-Length: 005\r\nContent-Length: 5,5\r\n"])
def test_a_repeated_content_length_comes_out_as_one_field(fields: bytes) -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: web\r\n" + fields + b"\r\nhello")
    req = parser.next_event()
    assert isinstance(req, Request) and req.content_length == 5
    assert [v for n, v in req.headers if n == b"content-length"] in ([b"5"], [b"005"])
    up = ResponseParser()
    up.request_sent(b"GET")
    up.feed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello")
    resp = up.next_event()
    assert isinstance(resp, Response) and len([v for n, v in resp.headers if n == b"content-length"]) == 1


# --- real sockets: zmesh, HAProxy and nginx ------------------------------------------------------------


def _hostile_upstream(_conn: socket.socket, seen: Seen) -> bytes:
    """What an upstream the proxies should not trust answers, by path."""
    if seen.target == b"/resp-conn-cl":
        return b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
    if seen.target == b"/resp-cl-list":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"
    if seen.target == b"/resp-trailers":
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                b"Content-Length: 99\r\nHost: evil\r\nX-Ok: 1\r\n\r\n")
    body = b"trailers: " + b",".join(n for n, _ in seen.trailers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class Peers:
    """Everything a vector can be sent to, by name, and the upstreams behind them."""

    ports: dict[str, int]
    recording: RecordingBackend
    hostile: Backend


ZMESH = ("zmesh-out", "zmesh-in", "zmesh-in-merge", "zmesh-hostile")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    recording = RecordingBackend(delay=1.0)
    hostile = Backend(_hostile_upstream)
    with contextlib.ExitStack() as stack:
        stack.callback(recording.close)
        stack.callback(hostile.close)
        ports: dict[str, int] = {}
        for name, upstream in (("", recording.port), ("-hostile", hostile.port)):
            mktemp = tmp_path_factory.mktemp
            ports["haproxy" + name] = stack.enter_context(haproxy(mktemp("haproxy"), upstream))
            ports["nginx" + name] = stack.enter_context(nginx(mktemp("nginx"), upstream))
        other = route(headers={"request": {"set": {"x-routed": "other"}}})
        out = make_config(vhosts=[{"name": "other", "domains": ["other.example"], "routes": [other]},
                                  {"name": "any", "domains": ["*"], "routes": [route()]}],
                          endpoints={CLUSTER: [endpoint(recording.port)]})
        inbound = inbound_config(recording.port, "HTTP", [deny("no-admin", op(paths=["/admin*"]))])
        merge = inbound_config(recording.port, "HTTP", [deny("no-admin", op(paths=["/admin*"]))])
        merge["security"]["path_normalization"] = MERGE_SLASHES
        cluster = f"inbound|{recording.port}||"
        hostile_cfg = make_config(endpoints={CLUSTER: [endpoint(hostile.port)]})
        for name, proxy in (("zmesh-out", Proxy(out)), ("zmesh-in", Proxy(inbound, inbound_cluster=cluster)),
                            ("zmesh-in-merge", Proxy(merge, inbound_cluster=cluster)),
                            ("zmesh-hostile", Proxy(hostile_cfg))):
            stack.callback(proxy.close)
            ports[name] = proxy.port
        yield Peers(ports, recording, hostile)


@pytest.fixture(scope="module")
def table() -> Iterator[list[str]]:
    """Rows `vector | zmesh | HAProxy | nginx`, printed when the module is done (pytest -s)."""
    rows: list[str] = []
    yield rows
    print("\nvector | zmesh | HAProxy | nginx")
    for row in rows:
        print(row)


_SHOWN = (b"host", b"content-length", b"transfer-encoding", b"x-hop")  # fields a cell names


def _cell(outcome: Outcome, seen: list[RecordedRequest], hostile: bool) -> str:
    """What a peer answered and, for the recording upstream, what reached it (line, key fields);
    for the hostile one, the first response's framing, body and trailers as the client got them."""
    codes = ",".join(map(str, outcome.statuses())) or "-"
    if hostile:
        try:
            r = _responses(outcome.response, 1)[0]
        except AssertionError:
            return f"{codes} (no complete response)"
        trailers = ",".join(n.decode() for n, _ in r.trailers) or "none"
        cl = b",".join(r.fields(b"content-length")).decode() or "-"
        return f"{codes} (content-length {cl}, body {r.body.decode(errors='replace')!r}, trailers {trailers})"
    reqs = []
    for req in seen:
        shown = ", ".join(f"{n.decode()}={b','.join(req.header(n)).decode(errors='replace')}"
                          for n in _SHOWN if req.header(n))
        reqs.append(f"{req.line.decode(errors='replace')} [{shown}]")
    return f"{codes} (backend saw: {' ; '.join(reqs) or 'nothing'})"


@dataclass
class Parsed:
    head: Response
    body: bytes
    trailers: tuple[tuple[bytes, bytes], ...]

    def fields(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.head.headers if n == name]


def _responses(raw: bytes, count: int) -> list[Parsed]:
    """The first `count` responses in `raw` (to GETs/POSTs), parsed by our codec."""
    parser = ResponseParser()
    for _ in range(count):
        parser.request_sent(b"GET")
    parser.feed(raw)
    parser.feed_eof()
    out: list[Parsed] = []
    body: list[bytes] = []
    head: Response | None = None
    while len(out) < count:
        ev = parser.next_event()
        if isinstance(ev, Response):
            head, body = ev, []
        elif isinstance(ev, Data):
            body.append(ev.data)
        elif isinstance(ev, EndOfMessage) and head is not None:
            out.append(Parsed(head, b"".join(body), ev.trailers))
        else:
            raise AssertionError(f"{count} responses expected, got {len(out)} in {raw!r} ({ev!r})")
    return out


def _req(line: str, *fields: str, body: bytes = b"", close: bool = True) -> bytes:
    lines = [line, "Host: web", *fields]
    if close and not any(f.lower().startswith("connection:") for f in fields):
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"
SMUGGLED_ADMIN = b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n"
Check = Callable[[Outcome, list[RecordedRequest]], None]  # the requests the backend saw meanwhile


def _status(*codes: int) -> Check:
    def check(o: Outcome, _seen: list[RecordedRequest]) -> None:
        assert o.statuses() == list(codes), o.response
    return check


def _forwarded(*lines: bytes, **fields: list[bytes]) -> Check:
    """200, the backend saw exactly `lines`, and the last request it saw carried `fields`."""
    def check(o: Outcome, seen: list[RecordedRequest]) -> None:
        assert o.statuses() == [200] and o.backend_saw == list(lines), (o.response, o.backend_saw)
        for name, values in fields.items():
            assert seen[-1].header(name.replace("_", "-").encode()) == values
    return check


def _denied(o: Outcome, _seen: list[RecordedRequest]) -> None:
    assert o.statuses() == [403] and o.backend_saw == [], (o.response, o.backend_saw)


def _smuggling_refused(o: Outcome, seen: list[RecordedRequest]) -> None:
    assert o.statuses() == [200] and o.backend_saw == [b"POST /x HTTP/1.1"], o.backend_saw
    assert seen[0].body in (SMUGGLED, SMUGGLED_ADMIN)
    assert seen[0].header(b"content-length") == [b"%d" % len(seen[0].body)]


def _routed_by_target_authority(o: Outcome, seen: list[RecordedRequest]) -> None:
    _forwarded(b"GET /abs HTTP/1.1", host=[b"other.example"], x_routed=[b"other"])(o, seen)


def _request_trailers(o: Outcome, _seen: list[RecordedRequest]) -> None:
    [r] = _responses(o.response, 1)
    assert r.body == b"trailers: x-ok"


def _framed_keep_alive(o: Outcome, _seen: list[RecordedRequest]) -> None:
    first, second = _responses(o.response, 2)
    assert (first.body, first.fields(b"content-length")) == (b"hello", [b"5"])
    assert second.head.status == 200 and second.body == b"trailers: "


def _one_content_length(o: Outcome, _seen: list[RecordedRequest]) -> None:
    [r] = _responses(o.response, 1)
    assert (r.body, r.fields(b"content-length")) == (b"hello", [b"5"])


def _response_trailers(o: Outcome, _seen: list[RecordedRequest]) -> None:
    [r] = _responses(o.response, 1)
    assert (r.body, r.trailers) == (b"hello", ((b"x-ok", b"1"),))


@dataclass
class Vector:
    name: str
    zmesh: str  # which zmesh listener: see ZMESH
    data: bytes
    check: Check

    @property
    def hostile(self) -> bool:
        return self.zmesh == "zmesh-hostile"


CHUNKED_TRAILERS = b"5\r\nhello\r\n0\r\nHost: evil\r\nContent-Length: 99\r\nX-Ok: 1\r\n\r\n"
VECTORS = [
    # item 1: what Connection nominates never changes framing or routing
    Vector("conn-content-length", "zmesh-out",
           _req("POST /x HTTP/1.1", "Connection: close, content-length", f"Content-Length: {len(SMUGGLED)}",
                body=SMUGGLED),
           _smuggling_refused),
    Vector("conn-content-length-past-deny", "zmesh-in",
           _req("POST /x HTTP/1.1", "Connection: close, content-length",
                f"Content-Length: {len(SMUGGLED_ADMIN)}", body=SMUGGLED_ADMIN), _smuggling_refused),
    Vector("conn-host", "zmesh-out", _req("GET /h HTTP/1.1", "Connection: close, host, x-hop", "X-Hop: 1"),
           _forwarded(b"GET /h HTTP/1.1", host=[b"web"], x_hop=[])),
    Vector("conn-transfer-encoding", "zmesh-out",
           _req("POST /te HTTP/1.1", "Connection: close, transfer-encoding", "Transfer-Encoding: chunked",
                body=b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
           _forwarded(b"POST /te HTTP/1.1", transfer_encoding=[b"chunked"])),
    Vector("response-conn-content-length", "zmesh-hostile",
           _req("GET /resp-conn-cl HTTP/1.1", close=False) + _req("GET /next HTTP/1.1"), _framed_keep_alive),
    # item 3: absolute-form and path normalisation before authorization and routing
    Vector("absolute-form-admin", "zmesh-in", _req("GET http://web/admin HTTP/1.1"), _denied),
    Vector("absolute-form-other-authority", "zmesh-out", _req("GET http://other.example/abs HTTP/1.1"),
           _routed_by_target_authority),
    Vector("absolute-form-https", "zmesh-out", _req("GET https://web/x HTTP/1.1"), _status(400)),
    Vector("absolute-form-userinfo", "zmesh-out", _req("GET http://u@web/x HTTP/1.1"), _status(400)),
    Vector("dot-admin", "zmesh-in", _req("GET /./admin HTTP/1.1"), _denied),
    Vector("dotdot-admin", "zmesh-in", _req("GET /x/../admin HTTP/1.1"), _denied),
    Vector("escaped-admin", "zmesh-in", _req("GET /%61dmin HTTP/1.1"), _denied),
    Vector("escaped-dotdot-admin", "zmesh-in", _req("GET /%2e%2e/admin HTTP/1.1"), _denied),
    Vector("double-slash-admin-base", "zmesh-in", _req("GET //admin HTTP/1.1"),
           _forwarded(b"GET //admin HTTP/1.1")),  # Istio's BASE keeps `//` (MERGE_SLASHES merges it)
    Vector("double-slash-admin-merge", "zmesh-in-merge", _req("GET //admin HTTP/1.1"), _denied),
    Vector("backslash-admin-merge", "zmesh-in-merge", _req("GET /\\admin HTTP/1.1"), _denied),
    Vector("dot-path-forwarded-normalised", "zmesh-out", _req("GET /a/./b/../c?q=/./ HTTP/1.1"),
           _forwarded(b"GET /a/c?q=/./ HTTP/1.1")),
    Vector("fragment", "zmesh-out", _req("GET /x#frag HTTP/1.1"), _status(400)),
    Vector("escaped-nul", "zmesh-out", _req("GET /a%00b HTTP/1.1"), _status(400)),
    Vector("bad-escape", "zmesh-out", _req("GET /a%zz HTTP/1.1"), _status(400)),
    Vector("asterisk-form-get", "zmesh-out", _req("GET * HTTP/1.1"), _status(400)),
    Vector("authority-form-get", "zmesh-out", _req("GET web:80 HTTP/1.1"), _status(400)),
    Vector("relative-path", "zmesh-out", _req("GET admin HTTP/1.1"), _status(400)),
    # item 11: trailers and repeated Content-Length
    Vector("content-length-list", "zmesh-out",
           _req("POST /cl HTTP/1.1", "Content-Length: 5, 5", body=b"hello"),
           _forwarded(b"POST /cl HTTP/1.1", content_length=[b"5"])),
    Vector("content-length-repeated", "zmesh-out",
           _req("POST /cl HTTP/1.1", "Content-Length: 5", "Content-Length: 5", body=b"hello"),
           _forwarded(b"POST /cl HTTP/1.1", content_length=[b"5"])),
    Vector("request-trailers", "zmesh-hostile",
           _req("POST /t HTTP/1.1", "Transfer-Encoding: chunked", body=CHUNKED_TRAILERS), _request_trailers),
    Vector("response-content-length-list", "zmesh-hostile", _req("GET /resp-cl-list HTTP/1.1"),
           _one_content_length),
    Vector("response-trailers", "zmesh-hostile", _req("GET /resp-trailers HTTP/1.1"), _response_trailers),
]


def _send(p: Peers, name: str, data: bytes, hostile: bool) -> Outcome:
    return exchange(p.ports[name], data, timeout=5.0, peer=name, backend=None if hostile else p.recording)


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_vector(vector: Vector, peers: Peers, table: list[str]) -> None:
    before = len(peers.recording.seen)
    zmesh = _send(peers, vector.zmesh, vector.data, vector.hostile)
    seen = peers.recording.seen[before:]
    cells = [_cell(zmesh, seen, vector.hostile)]
    for name in ("haproxy", "nginx"):
        before = len(peers.recording.seen)
        ref = _send(peers, name + ("-hostile" if vector.hostile else ""), vector.data, vector.hostile)
        cells.append(_cell(ref, peers.recording.seen[before:], vector.hostile))
    table.append(" | ".join([vector.name, *cells]))
    assert zmesh.closed  # every vector asks for (or earns) a close: nothing is left hanging
    vector.check(zmesh, seen)


def _victim(port: int) -> bytes:
    """An attacker smuggles a slow request behind `Connection: content-length` on a keep-alive
    connection; a victim on another connection then asks for /victim (the upstream connection
    is pooled and reused). Returns the body the victim got."""
    attack = _req("POST /x HTTP/1.1", "Connection: content-length", "Content-Length: 33",
                  body=b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n", close=False)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as attacker:
        attacker.sendall(attack)
        got = b""
        while b"seen POST /x" not in got:
            chunk = attacker.recv(65536)
            assert chunk, got
            got += chunk
        victim = exchange(port, _req("GET /victim HTTP/1.1"), timeout=10.0)
    [r] = _responses(victim.response, 1)
    return r.body


@pytest.mark.parametrize("peer", ["zmesh-out", "haproxy", "nginx"])
def test_a_smuggled_request_never_answers_another_client(peer: str, peers: Peers, table: list[str]) -> None:
    before = len(peers.recording.seen)
    body = _victim(peers.ports[peer])
    saw = [s.line.decode() for s in peers.recording.seen[before:]]
    table.append(f"victim-on-pooled-upstream ({peer}) | victim got {body.decode()!r}; backend saw {saw}")
    if peer.startswith("zmesh"):
        assert body == b"seen GET /victim HTTP/1.1"
        assert saw == ["POST /x HTTP/1.1", "GET /victim HTTP/1.1"]


def test_inbound_deny_holds_for_every_spelling_on_one_keep_alive_connection(peers: Peers) -> None:
    """The per-connection routing cache must not carry one request's decision to the next."""
    spellings = [b"/admin", b"/./admin", b"/%61dmin", b"http://web/admin", b"/x/../admin/users"]
    data = b"".join(_req(f"GET {s.decode()} HTTP/1.1", close=False) for s in spellings)
    data += _req("GET /fine HTTP/1.1")
    out = exchange(peers.ports["zmesh-in"], data, timeout=5.0, backend=peers.recording)
    statuses = [r.head.status for r in _responses(out.response, len(spellings) + 1)]
    assert statuses == [403] * len(spellings) + [200]
    assert out.backend_saw == [b"GET /fine HTTP/1.1"]
