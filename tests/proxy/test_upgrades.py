"""Only allowed upgrades make a tunnel (upgrades.py), on real sockets through the real engine, in
front of an app that answers 101 to every Upgrade it sees (and to /switch, asked or not).

websocket tunnels; h2c goes to the app as a plain request (Upgrade stripped); any other type gets
403 and CONNECT too unless allowed; an unrequested 101 is a 502 (UPE). After a refused upgrade the
connection serves the next request as HTTP, routed and authorized: a DENY policy proves it.

`test_reference_peers_upgrade_table` sends the same exchanges to HAProxy and nginx in front of the
same app and prints the table: vector | zmesh | HAProxy | nginx.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy.http.codec import EndOfMessage, Request, RequestParser, TunnelData
from dataplane.proxy.http.options import DEFAULT, HttpOptions
from dataplane.proxy.http.upgrades import FORWARD, REFUSE, STRIP, stripped, verdict
from tests.conftest import wait_for
from tests.proxy.l7helpers import Backend, Client, Proxy, Seen, reply
from tests.proxy.reference_peers import haproxy, nginx
from tests.proxy.test_authz_proxy import deny, inbound_config, op
from tests.proxy.test_hostile_timeouts import proxy_to

SERVICE = "svc.default.svc.cluster.local"


def switching(conn: socket.socket, seen: Seen) -> bytes | None:
    """The app: 101 (CONNECT: 200) to any Upgrade and to /switch, then a tunnel answering each read
    with "tunnel:" and the bytes; a plain 200 naming the request otherwise."""
    upgrade = seen.headers.get(b"upgrade")
    if seen.method == b"CONNECT":
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    elif upgrade is not None or seen.target.startswith(b"/switch"):
        key = seen.headers.get(b"sec-websocket-key", b"") + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n"
                     b"Sec-WebSocket-Accept: %s\r\n\r\n"
                     % (upgrade or b"anything", base64.b64encode(hashlib.sha1(key).digest())))
    else:
        return reply(200, b"http " + seen.target)
    while data := conn.recv(65536):
        conn.sendall(b"tunnel:" + data)
    return None


@pytest.fixture
def app() -> Iterator[Backend]:
    backend = Backend(switching)
    yield backend
    backend.close()


def upgrade(kind: str, path: str = "/first") -> bytes:
    if kind == "CONNECT":
        return b"CONNECT svc:80 HTTP/1.1\r\nHost: svc:80\r\n\r\n"
    extra = ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
             if kind == "websocket" else "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")
    return (f"GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {kind}\r\n"
            f"{extra}\r\n").encode()


def test_only_allowed_types_are_tunnelled() -> None:
    default = DEFAULT.upgrade_types
    assert verdict(b"GET", b"websocket", default) == FORWARD
    assert verdict(b"GET", b"WebSocket ", default) == FORWARD
    assert verdict(b"GET", b"h2c", default) == STRIP
    assert verdict(b"GET", b"h2c", default | {b"h2c"}) == STRIP  # never a tunnel: h2c smuggling
    assert verdict(b"GET", b"anything", default) == REFUSE
    assert verdict(b"GET", b"websocket, anything", default) == REFUSE
    assert verdict(b"CONNECT", None, default) == REFUSE
    assert verdict(b"CONNECT", None, default | {b"connect"}) == FORWARD
    assert verdict(b"GET", None, frozenset()) == FORWARD


def test_a_stripped_upgrade_does_not_pause_the_parser() -> None:
    parser = RequestParser()
    parser.feed(upgrade("h2c") + b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
    first = parser.next_event()
    assert isinstance(first, Request) and verdict(first.method, first.upgrade, DEFAULT.upgrade_types) == STRIP
    assert stripped(first, parser).upgrade is None
    assert isinstance(parser.next_event(), EndOfMessage)
    second = parser.next_event()  # not PAUSED: HTTP goes on
    assert isinstance(second, Request) and second.target == b"/second"


def test_websocket_tunnels(app: Backend) -> None:
    with proxy_to(app.port) as proxy:
        c = Client(proxy.port)
        c.send(upgrade("websocket"))
        assert c.response().status == 101
        c.send(b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")  # no longer HTTP: the tunnel's bytes
        assert _read(c, len(b"tunnel:GET /second")).startswith(b"tunnel:GET /second")
        assert app.seen[0].headers[b"upgrade"] == b"websocket"
        assert b"http2-settings" not in app.seen[0].headers


def bulk(conn: socket.socket, seen: Seen) -> None:
    """The app for a bulk tunnel: 101 with "hello" right behind it, then everything until the
    client's FIN, answered with its digest and length and 3 MiB, then close."""
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                 b"hello")
    digest, size = hashlib.sha256(), 0
    while data := conn.recv(65536):
        digest.update(data)
        size += len(data)
    conn.sendall(b"%s %d\n" % (digest.hexdigest().encode(), size) + BULK_DOWN)
    conn.close()


BULK_UP = bytes(range(256)) * (2 * 4096)  # 2 MiB
BULK_DOWN = bytes(range(255, -1, -1)) * (3 * 4096)  # 3 MiB


def test_a_tunnel_passes_bulk_and_half_closes_both_ways() -> None:
    """The pump (pump.Way, as L4's) in a tunnel: bytes that came with the heads go first, MiBs
    both ways under back-pressure, the client's FIN reaches the app, the app's reaches the client."""
    app = Backend(bulk)
    try:
        with proxy_to(app.port) as proxy:
            c = Client(proxy.port)
            c.send(upgrade("websocket", "/bulk") + b"early")
            assert c.response().status == 101
            c.sock.sendall(BULK_UP)
            c.sock.shutdown(socket.SHUT_WR)
            got = _read(c, 1 << 30)  # until the app's FIN, passed on
            sent = b"early" + BULK_UP
            digest = hashlib.sha256(sent).hexdigest().encode()
            assert got == b"hello%s %d\n%s" % (digest, len(sent), BULK_DOWN)
            assert wait_for(lambda: proxy.requests().get((SERVICE, "101", "-")) == 1)
    finally:
        app.close()


def test_h2c_goes_as_a_plain_request_and_http_goes_on(app: Backend) -> None:
    with proxy_to(app.port) as proxy:
        c = Client(proxy.port)
        c.send(upgrade("h2c"))
        r = c.response()
        assert (r.status, r.body) == (200, b"http /first")
        assert not {b"upgrade", b"http2-settings"} & set(app.seen[0].headers)
        assert b"upgrade" not in app.seen[0].headers.get(b"connection", b"").lower()
        assert c.request(path="/second").body == b"http /second"


def test_an_unrequested_101_is_a_502_and_http_goes_on(app: Backend) -> None:
    with proxy_to(app.port) as proxy:
        c = Client(proxy.port)
        c.send(upgrade("h2c", "/switch"))  # stripped, yet the app switches
        assert c.response().status == 502
        assert c.request(path="/second").body == b"http /second"
        assert wait_for(lambda: proxy.requests().get((SERVICE, "502", "UPE")) == 1)
        assert wait_for(lambda: [p["open"] for p in proxy.pools()] == [1])  # the switched one closed


def test_other_types_and_connect_get_403_and_http_goes_on(app: Backend) -> None:
    with proxy_to(app.port) as proxy:
        c = Client(proxy.port)
        for kind in ("anything", "CONNECT"):
            c.send(upgrade(kind))
            r = c.response()
            assert (r.status, r.body) == (403, b"")
            assert c.request(path="/second").body == b"http /second"
        assert [s.target for s in app.seen] == [b"/second", b"/second"]  # the refused ones never left


def test_connect_tunnels_when_allowed(app: Backend) -> None:
    with proxy_to(app.port, HttpOptions(upgrade_types=frozenset({b"websocket", b"connect"}))) as proxy:
        c = Client(proxy.port)
        c.send(upgrade("CONNECT"))
        assert c.response("CONNECT").status == 200
        c.send(b"hello")
        assert _read(c, len(b"tunnel:hello")) == b"tunnel:hello"


@pytest.fixture
def guarded(app: Backend) -> Iterator[Proxy]:
    """The inbound side of the app, with a DENY policy on /denied."""
    cfg = inbound_config(app.port, "HTTP", [deny("no-denied", op(paths=["/denied*"]))])
    proxy = Proxy(cfg, inbound_cluster=f"inbound|{app.port}||")
    yield proxy
    proxy.close()


def test_upgrades_are_authorized_and_the_next_request_too(app: Backend, guarded: Proxy) -> None:
    c = Client(guarded.port)
    c.send(upgrade("websocket", "/denied/ws"))
    r = c.response()
    assert (r.status, r.body) == (403, b"RBAC: access denied")
    c.send(upgrade("anything", "/ok"))  # refused: the connection stays HTTP...
    assert c.response().status == 403
    assert c.request(path="/denied/after").status == 403  # ...authorized...
    assert c.request(path="/ok").body == b"http /ok"  # ...and routed
    c.send(upgrade("websocket", "/ok/ws"))
    assert c.response().status == 101
    assert [s.target for s in app.seen] == [b"/ok", b"/ok/ws"]


def _read(c: Client, size: int) -> bytes:
    """Bytes after a switch: what the parser kept, then the socket's, until `size` (or EOF)."""
    got = b""
    while (ev := c.parser.next_event()).__class__ in (TunnelData, EndOfMessage):  # the 101's end first
        if ev.__class__ is TunnelData:
            got += ev.data
    c.sock.settimeout(5)
    while len(got) < size and (data := c.sock.recv(65536)):
        got += data
    return got


# --- the same exchanges through HAProxy and nginx -------------------------------------------------

KINDS = ("websocket", "h2c", "anything", "CONNECT")


def exchange(port: int, kind: str) -> str:
    """The upgrade request, then "GET /second" on the same connection: what each got."""
    c = Client(port, timeout=3)
    try:
        c.send(upgrade(kind))
        first = c.response("CONNECT" if kind == "CONNECT" else "GET").status
    except (OSError, ConnectionError):
        return "closed"
    try:
        c.send(b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
        if first == 101 or (kind == "CONNECT" and first == 200):
            second = _read(c, len(b"tunnel:GET /second"))
            tunnelled = second.startswith(b"tunnel:GET /second")
            return f"{first} then {'tunnelled unrouted' if tunnelled else repr(second[:30])}"
        r = c.response()
        return f"{first} then HTTP {r.status} {r.body.decode(errors='replace')}"
    except (OSError, ConnectionError):
        return f"{first} then closed"
    finally:
        c.close()


def test_reference_peers_upgrade_table(app: Backend, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        ports = {"zmesh": stack.enter_context(proxy_to(app.port)).port,
                 "HAProxy": stack.enter_context(haproxy(_mkdir(tmp_path, "haproxy"), app.port)),
                 "nginx": stack.enter_context(nginx(_mkdir(tmp_path, "nginx"), app.port))}
        with ThreadPoolExecutor(len(KINDS) * len(ports)) as pool:
            futures: dict[tuple[str, str], Any] = {(k, p): pool.submit(exchange, port, k)
                                                   for k in KINDS for p, port in ports.items()}
            got = {key: f.result() for key, f in futures.items()}
    print("\nvector | zmesh | HAProxy | nginx")
    for kind in KINDS:
        print(" | ".join([f"Upgrade: {kind}" if kind != "CONNECT" else "CONNECT",
                          *(got[kind, p] for p in ("zmesh", "HAProxy", "nginx"))]))
    assert got["websocket", "zmesh"] == "101 then tunnelled unrouted"
    assert got["h2c", "zmesh"] == "200 then HTTP 200 http /second"
    assert got["anything", "zmesh"] == got["CONNECT", "zmesh"] == "403 then HTTP 200 http /second"


def _mkdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    return path
