"""The demo app: Istio's bookinfo as tiny Python HTTP/1.1 services.

    productpage  GET /productpage  calls details and reviews by service name
    details      GET /details/<id>
    reviews      GET /reviews/<id>  v1 alone; v2 and v3 call ratings
    ratings      GET /ratings/<id>
    external     any path: a server outside the mesh ("the internet")

Every answer is JSON naming the service and version that served it, so a caller can tell
which subset a route picked. The `end-user` header is passed on, as bookinfo does, so
header matches work at every hop. Nothing here knows about proxies: the apps dial service
names and the pod's iptables send them through the sidecar. Without iptables (explicit mode on
loopback) `--upstream-host` names the sidecar's outbound address: the apps dial it and say the
service in the Host header.

A request carrying `x-fail-once: <token>` is answered 500 the first time that token is seen
(then normally): a backend that fails once, for retry demos (500, not 503, which Istio's
default retry policy already retries).

    python -m meshctl.localmesh.bookinfo <service> <version> --port 9080
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

SERVICES = ("productpage", "details", "reviews", "ratings", "external")  # external: outside the mesh
FORWARDED = ("end-user", "x-request-id")
# bookinfo's own timeouts: productpage gives details and reviews 3 s, reviews gives ratings 10 s
TIMEOUTS = {"details": 3.0, "reviews": 3.0, "ratings": 10.0}
STARS = {"v2": "black", "v3": "red"}


def call(service: str, path: str, headers: dict[str, str], port: int = 9080,
         via: str | None = None) -> dict[str, Any]:
    """GET http://<service>:<port><path> (sent to `via`:<port> when given); an error comes back as
    {"error": status or reason}."""
    conn = http.client.HTTPConnection(via or service, port, timeout=TIMEOUTS.get(service, 3.0))
    try:
        conn.request("GET", path, headers={**headers, "Host": f"{service}:{port}"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return {"error": resp.status, "body": body.decode(errors="replace")[:200]}
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"error": type(exc).__name__, "detail": str(exc)}
    finally:
        conn.close()


class App:
    """One service's behaviour, without the HTTP server around it."""

    def __init__(self, service: str, version: str, upstream_port: int = 9080,
                 upstream_host: str | None = None) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        self.service, self.version, self.upstream_port = service, version, upstream_port
        self.upstream_host = upstream_host
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def fail_once(self, token: str) -> bool:
        """True the first time `token` is seen."""
        with self._lock:
            if token in self._failed:
                return False
            self._failed.add(token)
            return True

    def handle(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = headers.get("x-fail-once")
        if token and self.fail_once(token):
            return 500, {"service": self.service, "version": self.version, "error": "failing once"}
        passed = {k: v for k, v in headers.items() if k in FORWARDED}
        out: dict[str, Any] = {"service": self.service, "version": self.version}
        part, _, rest = path.strip("/").partition("/")
        item = rest or "0"
        if path in ("/", "/health") or self.service == "external":
            return 200, {**out, "status": "ok"}
        if self.service == "productpage" and part == "productpage":
            out["details"] = self.call("details", "/details/0", passed)
            out["reviews"] = self.call("reviews", "/reviews/0", passed)
        elif self.service == "details" and part == "details":
            out.update(id=item, author="William Shakespeare", year=1595, type="paperback")
        elif self.service == "reviews" and part == "reviews":
            out.update(id=item, reviews=["An extremely entertaining play by Shakespeare.",
                                         "Absolutely fun and entertaining."])
            if self.version in STARS:
                out.update(stars=STARS[self.version],
                           ratings=self.call("ratings", f"/ratings/{item}", passed))
        elif self.service == "ratings" and part == "ratings":
            out.update(id=item, ratings={"Reviewer1": 5, "Reviewer2": 4})
        else:
            return 404, {**out, "error": f"no such path {path}"}
        if "end-user" in headers:
            out["end-user"] = headers["end-user"]
        return 200, out

    def call(self, service: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
        return call(service, path, headers, self.upstream_port, self.upstream_host)


def handler_for(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status, body = app.handle(self.path, {k.lower(): v for k, v in self.headers.items()})
            data = json.dumps(body).encode() + b"\n"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the sidecar's access log has every request

    return Handler


@click.command()
@click.argument("service", type=click.Choice(SERVICES))
@click.argument("version")
@click.option("--port", type=int, default=9080, show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--upstream-port", type=int, default=9080, show_default=True,
              help="Port the services it calls use.")
@click.option("--upstream-host", default=None,
              help="Send calls here (the sidecar's outbound listeners), not to the service's name.")
def main(service: str, version: str, port: int, host: str, upstream_port: int,
         upstream_host: str | None) -> None:
    """Serve one bookinfo service."""
    app = App(service, version, upstream_port, upstream_host)
    server = ThreadingHTTPServer((host, port), handler_for(app))
    server.daemon_threads = True
    print(f"bookinfo {service} {version} listening on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
