"""Helpers for the L7 tests: tiny threaded HTTP/1.1 backends, a proxy on a reactor thread, and
configs in pilot's schema (built by hand, or taken from pilot's translation and pointed at the
local backends)."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataplane.proxy import sockets
from dataplane.proxy.accesslog import AccessLog
from dataplane.proxy.http.codec import (
    NEED_DATA,
    Data,
    EndOfMessage,
    Request,
    RequestParser,
    Response,
    ResponseParser,
)
from dataplane.proxy.http.server import HttpConnection
from dataplane.proxy.http.state import http_state
from dataplane.proxy.reactor import EPOLLIN, Reactor
from dataplane.proxy.runtime import Runtime
from dataplane.proxy.stats import LABELS, Stats, Workload
from tests.proxy.backends import Backend as TcpBackend
from tests.proxy.backends import run_on

CLUSTER = "outbound|80||svc.default.svc.cluster.local"


@dataclass
class Seen:
    """One request as a backend received it."""

    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: tuple[tuple[bytes, bytes], ...] = ()


def reply(status: int = 200, body: bytes = b"ok", headers: list[tuple[bytes, bytes]] | None = None,
          reason: bytes = b"OK") -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, reason), b"content-length: %d" % len(body)]
    head += [b"%s: %s" % h for h in headers or ()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


Handler = Callable[[socket.socket, Seen], bytes | None]


class Backend(TcpBackend):
    """A threaded HTTP/1.1 server (keep-alive, pipelining, chunked: the codec parses) calling
    `handler(conn, seen)` per request; it returns the raw response, or None after writing (or
    breaking) the connection itself. `seen` collects every request."""

    def __init__(self, handler: Handler | None = None, name: bytes = b"backend") -> None:
        self.name = name
        self.http_handler = handler or (lambda _c, _s: reply(200, self.name))
        self.seen: list[Seen] = []
        super().__init__(self._serve, nodelay=True)

    @property
    def address(self) -> dict[str, Any]:
        return endpoint(self.port)

    def _serve(self, conn: socket.socket) -> None:
        parser = RequestParser()
        current: Seen | None = None
        body: list[bytes] = []
        with contextlib.suppress(OSError):
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    data = conn.recv(65536)
                    if not data:
                        break
                    parser.feed(data)
                    continue
                if isinstance(ev, Request):
                    current = Seen(ev.method, ev.target, dict(ev.headers), b"", list(ev.headers))
                    body = []
                elif isinstance(ev, Data):
                    body.append(ev.data)
                elif isinstance(ev, EndOfMessage) and current is not None:
                    current.body = b"".join(body)
                    current.trailers = ev.trailers
                    self.seen.append(current)
                    out = self.http_handler(conn, current)
                    if out is None:
                        break
                    if current.method == b"HEAD":
                        out = out[:out.find(b"\r\n\r\n") + 4]  # a HEAD response has no body
                    conn.sendall(out)
                    if current.headers.get(b"connection") == b"close":
                        break
                else:
                    break
        with contextlib.suppress(OSError):
            conn.close()



def endpoint(port: int, **extra: Any) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "weight": 1, "locality": "", "healthy": True,
            "labels": {}, "service_account": "", "tls_mode": "disabled", **extra}


def cluster_spec(name: str = CLUSTER, **extra: Any) -> dict[str, Any]:
    return {"name": name, "direction": "outbound", "type": "EDS", "service": name.rsplit("|", 1)[-1],
            "port": 80, "connection_pool": {"tcp": {"connect_timeout_ms": 1000}}, **extra}


def route(clusters: list[tuple[str, int]] | str = CLUSTER, name: str = "default",
          **extra: Any) -> dict[str, Any]:
    if isinstance(clusters, str):
        clusters = [(clusters, 100)]
    return {"name": name, "match": {}, "clusters": [{"name": c, "weight": w} for c, w in clusters], **extra}


def make_config(routes: list[dict[str, Any]] | None = None, *,
                clusters: dict[str, dict[str, Any]] | None = None,
                endpoints: dict[str, list[dict[str, Any]]] | None = None,
                domains: tuple[str, ...] = ("*",), vhosts: list[dict[str, Any]] | None = None,
                version: str = "v1", inbound: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A proxy config with one route config "80" (by hand, in pilot's schema)."""
    clusters = clusters if clusters is not None else {CLUSTER: cluster_spec()}
    if vhosts is None:
        vhosts = [{"name": "svc:80", "domains": list(domains), "routes": routes or [route()]}]
    return {"version": version,
            "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [], "inbound": inbound or []},
            "routes": {"80": {"name": "80", "virtual_hosts": vhosts}},
            "clusters": clusters, "endpoints": endpoints or {}}


class Proxy:
    """A Runtime on a reactor thread with one explicit HTTP listener (outbound route config "80",
    or inbound to a cluster)."""

    def __init__(self, config: dict[str, Any], *, inbound_cluster: str | None = None,
                 **conn_kw: Any) -> None:
        self.reactor = Reactor()
        self.log_out = io.StringIO()
        self.runtime = Runtime(self.reactor, Stats(Workload(name="client", namespace="default")),
                               AccessLog(self.log_out, flush_interval=0.0), "sidecar~test")
        self.runtime.apply(config)
        self.inbound_cluster = inbound_cluster
        self.conn_kw = conn_kw
        self.lsock = sockets.listener("127.0.0.1", 0, reuseport=False)
        self.port: int = self.lsock.getsockname()[1]
        self.reactor.register(self.lsock.fileno(), EPOLLIN, self._accept)
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()

    def _accept(self, _mask: int) -> None:
        while True:
            try:
                conn, addr = self.lsock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            if self.inbound_cluster is None:
                HttpConnection(self.runtime, conn, direction="outbound", route_port="80",
                               inbound_cluster=None, peer=addr[:2], local=("127.0.0.1", self.port),
                               **self.conn_kw)
            else:
                HttpConnection(self.runtime, conn, direction="inbound", route_port=None,
                               inbound_cluster=self.inbound_cluster, peer=addr[:2],
                               local=("127.0.0.1", self.port), **self.conn_kw)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the reactor's thread and return its result."""
        return run_on(self.reactor, fn)

    def apply(self, config: dict[str, Any]) -> None:
        self.on_loop(lambda: self.runtime.apply(config))

    def requests(self) -> dict[tuple[str, str, str], int]:
        """istio_requests_total by (destination_service, response_code, response_flags)."""
        snap = self.on_loop(self.runtime.stats.snapshot)
        out: dict[tuple[str, str, str], int] = {}
        for labels, values in snap["requests"]:
            named = dict(zip(LABELS, labels, strict=True))
            k = (named["destination_service"], named["response_code"], named["response_flags"])
            out[k] = out.get(k, 0) + values[0]
        return out

    def log_lines(self) -> list[str]:
        self.on_loop(self.runtime.access_log.flush)
        return [line for line in self.log_out.getvalue().splitlines() if line]

    def pools(self) -> list[dict[str, Any]]:
        return self.on_loop(lambda: http_state(self.runtime).upstreams.state())

    def close(self) -> None:
        def stop() -> None:
            state = http_state(self.runtime)
            for conn in list(state.connections):
                conn._close()
            state.upstreams.close_all()
            self.reactor.unregister(self.lsock.fileno())
            self.lsock.close()

        with contextlib.suppress(Exception):
            self.on_loop(stop)
        self.reactor.stop()
        self.thread.join(5)


class Client:
    """A raw keep-alive client: send bytes, read whole responses (codec-parsed)."""

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ResponseParser()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", path: str = "/", host: str = "svc", body: bytes | None = None,
                headers: list[tuple[str, str]] | None = None) -> Reply:
        self.send(request_bytes(method, path, host, body, headers))
        return self.response(method)

    def response(self, method: str = "GET") -> Reply:
        """Read one response (for a request with `method`)."""
        self.parser.request_sent(method.encode())
        got: Reply | None = None
        body: list[bytes] = []
        while True:
            ev = self.parser.next_event()
            if ev is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    self.parser.feed_eof()
                else:
                    self.parser.feed(data)
                continue
            if isinstance(ev, Response):
                if ev.status < 200 and ev.status != 101:
                    continue
                got = Reply(ev.status, dict(ev.headers), b"", ev)
                if ev.status == 101:
                    return got
            elif isinstance(ev, Data):
                body.append(ev.data)
            elif isinstance(ev, EndOfMessage) and got is not None:
                got.body = b"".join(body)
                return got
            else:
                raise ConnectionError(f"no response: {ev!r}")

    def closed(self, timeout: float = 3.0) -> bool:
        """Whether the proxy closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    head: Any = None


def request_bytes(method: str = "GET", path: str = "/", host: str = "svc", body: bytes | None = None,
                  headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers or ()]
    if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in headers or ()):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
