"""The proxy's admin (127.0.0.1:15000) and Prometheus (15090) endpoints, Envoy's paths.

    GET  /config_dump        the config in force, its version, and the last rejected one (ETag: the
                             version; If-None-Match answers 304 while it is still in force)
    GET  /clusters           endpoints per cluster per worker: health, ejection, counters
    GET  /stats              proxy stats, Envoy's `name: value` text (all workers summed)
    GET  /stats/prometheus   Istio's metrics (also /metrics, and the whole of port 15090)
    GET  /memory             bytes in use (malloc's and resident), summed and per process (memory.py)
    GET  /ready              200 once a config is applied, every worker holds the workload
                             certificates (with --certs) and the proxy is not draining
    POST /drain              stop accepting; keep-alive connections are closed as they idle
    GET  /logging            the log level; POST /logging?level=debug changes it

They run in the supervisor, which asks the workers over their control channels.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dataplane.proxy import memory
from dataplane.proxy.stats import merge, merge_admin

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class AdminState:
    """What the admin pages read; the supervisor updates it as configs are applied."""

    def __init__(self, ask_workers: Callable[[dict[str, Any]], list[dict[str, Any]]], node_id: str) -> None:
        self.ask_workers = ask_workers
        self.node_id = node_id
        self.version = ""
        self.config: dict[str, Any] | None = None
        self.applied_at = 0.0
        self.rejected: dict[str, Any] | None = None
        self.draining = False

    def metrics(self) -> str:
        return merge(r["snapshot"] for r in self.ask_workers({"op": "stats"}))

    def not_ready(self) -> str | None:
        """Why the proxy cannot take traffic yet, or None. As Envoy's listeners wait for their SDS
        secrets, a proxy given --certs is not ready before every worker loaded them: until then its
        ISTIO_MUTUAL clusters would send plain text, and keep-alive connections opened that way
        would carry on after a STRICT PeerAuthentication arrives."""
        if self.draining:
            return "DRAINING"
        if not self.version:
            return "NO CONFIG"
        if not all(r.get("loaded") for r in self.ask_workers({"op": "certs"})):
            return "NO CERTIFICATES"
        return None


def _handler(state: AdminState, admin: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "zmesh-proxy"

        def log_message(self, *_args: Any) -> None:  # scrapes every few seconds: not worth a line
            pass

        def _send(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8",
                  headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(value, indent=2) + "\n", "application/json", headers)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path in ("/stats/prometheus", "/metrics") or not admin:
                    self._send(200, state.metrics(), PROMETHEUS)
                elif url.path == "/config_dump":
                    # the ETag is the version in force: a poller (the agent) asks with If-None-Match
                    # and gets a bodiless 304 until a new config is applied
                    etag = {"etag": f'"{state.version}"'}
                    if state.version and self.headers.get("if-none-match") == etag["etag"]:
                        self._send(304, "", headers=etag)
                    else:
                        self._json({"node": state.node_id, "version": state.version,
                                    "applied_at": state.applied_at, "config": state.config,
                                    "last_rejected": state.rejected}, headers=etag)
                elif url.path == "/clusters":
                    self._json([r["clusters"] for r in state.ask_workers({"op": "clusters"})])
                elif url.path == "/stats":
                    self._send(200, merge_admin(r["snapshot"] for r in state.ask_workers({"op": "stats"})))
                elif url.path == "/memory":
                    workers = [r["usage"] for r in state.ask_workers({"op": "memory"})]
                    self._json(memory.merge([{**memory.usage(), "worker": "supervisor"}, *workers]))
                elif url.path == "/ready":
                    reason = state.not_ready()
                    self._send(503 if reason else 200, f"{reason or 'LIVE'}\n")
                elif url.path == "/logging":
                    self._send(200, f"level: {logging.getLevelName(logging.getLogger('zmesh').level)}\n")
                else:
                    self._send(404, "not found\n")
            except Exception as exc:  # a worker that does not answer: say so, keep serving
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{type(exc).__name__}: {exc}\n")

        def do_POST(self) -> None:
            if not admin:
                self._send(405, "read only\n")
                return
            url = urlsplit(self.path)
            if url.path == "/drain":
                state.draining = True
                state.ask_workers({"op": "drain"})
                self._send(200, "OK\n")
            elif url.path == "/logging":
                level = (parse_qs(url.query).get("level") or [""])[0].upper()
                if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                    self._send(400, "level must be one of debug, info, warning, error\n")
                    return
                logging.getLogger("zmesh").setLevel(level)
                self._send(200, f"level: {level}\n")
            else:
                self._send(404, "not found\n")

    return Handler


def serve(state: AdminState, host: str, port: int, *, admin: bool) -> ThreadingHTTPServer:
    """Start the admin (admin=True) or metrics-only server in a daemon thread."""
    server = ThreadingHTTPServer((host, port), _handler(state, admin))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="admin" if admin else "metrics", daemon=True).start()
    return server
