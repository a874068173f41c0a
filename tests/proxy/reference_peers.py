"""HAProxy and nginx in front of a recording backend: the reference peers for hostile-input tests.

A hostile vector is sent as the same raw bytes to zmesh's sidecar and to both peers. The test
asserts what zmesh does and keeps a table of what each peer did (`Outcome.summary`), so a reviewer
can see where zmesh is stricter or looser than the proxies people already trust.

The recording backend parses leniently on purpose (its own tiny parser, not our codec): when a
proxy forwards a body it has stripped the framing of, the backend reads the body as a second
request, and `RecordingBackend.seen` shows the smuggled request line.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, stop, unavailable, wait_for
from tests.proxy.backends import Backend


@dataclass
class Seen:
    """One request as the backend read it."""

    line: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.fields if k.lower() == name.lower()]


class RecordingBackend(Backend):
    """A loopback HTTP/1.1 origin that records every request it reads, parsing as a naive app
    server would: Content-Length or chunked, else no body; keep-alive unless told to close.

    It answers each request with 200 and a body naming the request line, after `delay` seconds
    when the request line contains `/slow`."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.seen: list[Seen] = []
        super().__init__(self._serve)

    def lines(self) -> list[bytes]:
        return [s.line for s in self.seen]

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError, ValueError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                line, *rest = head.split(b"\r\n")
                fields = [tuple(x.strip() for x in h.split(b":", 1)) for h in rest if b":" in h]
                seen = Seen(line, fields, b"")  # type: ignore[arg-type]
                te = b",".join(seen.header(b"transfer-encoding")).lower()
                if b"chunked" in te:
                    body, buf = _read_chunked(conn, buf)
                else:
                    cl = seen.header(b"content-length")
                    size = int(cl[0].split(b",")[0]) if cl else 0
                    while len(buf) < size:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:size], buf[size:]
                seen.body = body
                self.seen.append(seen)
                if b"/slow" in line:
                    time.sleep(self.delay)
                out = b"seen " + line
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
                if any(v.lower() == b"close" for v in seen.header(b"connection")):
                    return


def _read_chunked(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += _recv(conn)
        size_line, buf = buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while b"\r\n\r\n" not in b"\r\n" + buf:
                buf += _recv(conn)
            end = (b"\r\n" + buf).index(b"\r\n\r\n") + 2
            return body, buf[end:]
        while len(buf) < size + 2:
            buf += _recv(conn)
        body, buf = body + buf[:size], buf[size + 2:]


def _recv(conn: socket.socket) -> bytes:
    data = conn.recv(65536)
    if not data:
        raise ValueError("eof inside a chunked body")
    return data


@dataclass
class Outcome:
    """What one peer did with one vector: the bytes it answered, whether it closed, how long it took
    to answer or close (capped by the exchange's timeout), and what the backend saw meanwhile."""

    peer: str
    response: bytes
    closed: bool
    seconds: float
    backend_saw: list[bytes] = field(default_factory=list)

    def statuses(self) -> list[int]:
        return [int(m) for m in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", self.response)]

    def summary(self) -> str:
        codes = ",".join(map(str, self.statuses())) or "-"
        saw = b" | ".join(self.backend_saw).decode(errors="replace") or "-"
        return (f"{self.peer:<8} status {codes:<10} {'closed' if self.closed else 'open':<6} "
                f"{self.seconds:5.1f}s backend saw: {saw}")


def exchange(port: int, data: bytes, *, timeout: float = 3.0, peer: str = "",
             backend: RecordingBackend | None = None) -> Outcome:
    """Send `data` to 127.0.0.1:`port`, half-open the write side only if the vector says so
    (never: an idle client must not be answered by our EOF), and read until the peer closes or
    `timeout` passes with nothing new."""
    before = len(backend.seen) if backend else 0
    start = time.monotonic()
    got = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            pass
    saw = [s.line for s in backend.seen[before:]] if backend else []
    return Outcome(peer, got, closed, time.monotonic() - start, saw)


HAPROXY_TIMEOUT_S = 10


@contextlib.contextmanager
def haproxy(tmp: Path, backend_port: int) -> Iterator[int]:
    """HAProxy (mode http, its defaults plus 10 s client/server/http-request timeouts) on a
    loopback port, forwarding to `backend_port`. Yields the port."""
    exe = shutil.which("haproxy")
    if not exe:
        unavailable("haproxy is not installed (make deps installs it)")
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client {HAPROXY_TIMEOUT_S}s
    timeout server {HAPROXY_TIMEOUT_S}s
    timeout http-request {HAPROXY_TIMEOUT_S}s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:{backend_port}
""")
    with _running([exe, "-db", "-f", str(conf)], port, tmp / "haproxy.log"):
        yield port


@contextlib.contextmanager
def nginx(tmp: Path, backend_port: int) -> Iterator[int]:
    """nginx as a reverse proxy (HTTP/1.1 upstream keep-alive, its default timeouts except 10 s
    client body/header timeouts) on a loopback port in front of `backend_port`. Yields the port."""
    exe = shutil.which("nginx")
    if not exe:
        unavailable("nginx is not installed (make deps installs it)")
    port = free_port()
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_header_timeout 10s;
    client_body_timeout 10s;
    upstream be {{ server 127.0.0.1:{backend_port}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
""")
    with _running([exe, "-c", str(conf), "-p", str(tmp)], port, tmp / "nginx.log"):
        yield port


@contextlib.contextmanager
def _running(argv: list[str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_for(lambda: _listening(port) or proc.poll() is not None, timeout=10) \
                or proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
        yield
    finally:
        stop(proc, timeout=5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
