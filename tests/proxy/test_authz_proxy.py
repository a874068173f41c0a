"""AuthorizationPolicy enforced by a real sidecar on loopback: the inbound listener (explicit
mode) in front of tiny backends, HTTP requests answered 403 "RBAC: access denied", TCP
connections closed, the denials in metrics and access log, and a CUSTOM policy NACKed by the
proxy process while the config in force stays.

Principals come from mutual TLS on the inbound connection: certificates issued by citadel's pki
(test_mtls.py's helpers), terminated by the inbound listener; the full identity matrix is sans-IO
in test_authz.py."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.proxy import sockets
from dataplane.proxy.accesslog import AccessLog
from dataplane.proxy.http.server import HttpConnection
from dataplane.proxy.http.state import http_state
from dataplane.proxy.listeners import SidecarListener
from dataplane.proxy.reactor import Reactor
from dataplane.proxy.runtime import ConfigError, Runtime
from dataplane.proxy.stats import Stats, Workload
from tests.conftest import MESHCTL, free_port, wait_for
from tests.proxy.backends import Backend as TcpBackend
from tests.proxy.backends import echo, run_on
from tests.proxy.l7helpers import Backend, Client, endpoint
from tests.proxy.l7helpers import Proxy as HttpProxy
from tests.proxy.test_mtls import CLIENT_ID, SERVER_ID, Ca, Side, server_config, tls_client, tls_get
from tests.proxy.test_mtls import SERVICE as MTLS_SERVICE

SERVICE = "app.default.svc.cluster.local"


def inbound_config(port: int, protocol: str, policies: list[dict[str, Any]],
                   version: str = "v1") -> dict[str, Any]:
    """A server-side config: the workload serves `port` (the local app on 127.0.0.1:`port`)."""
    cluster = f"inbound|{port}||"
    return {
        "version": version,
        "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [], "inbound": [
            {"name": f"inbound_{port}", "port": port, "protocol": protocol, "mtls_mode": "PERMISSIVE",
             "cluster": cluster, "services": [{"service": SERVICE, "port": 80}]}]},
        "routes": {},
        "clusters": {cluster: {"name": cluster, "direction": "inbound", "port": port,
                               "connection_pool": {"tcp": {"connect_timeout_ms": 1000}}}},
        "endpoints": {cluster: [endpoint(port)]},
        "security": {"mtls": {"mode": "PERMISSIVE", "ports": {}}, "authorization": policies},
    }


def deny(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"default/{name}", "action": "DENY", "rules": list(rules)}


def allow(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"default/{name}", "action": "ALLOW", "rules": list(rules)}


def audit(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"default/{name}", "action": "AUDIT", "rules": list(rules)}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


CUSTOM = {"name": "default/ext", "action": "CUSTOM", "rules": [{}], "provider": "ext-authz"}


class Sidecar:
    """A Runtime on a reactor thread with the inbound SidecarListener standing for `app_port`
    (explicit mode): what a worker runs, without the process around it."""

    def __init__(self, config: dict[str, Any], app_port: int) -> None:
        self.reactor = Reactor()
        self.log_out = io.StringIO()
        self.runtime = Runtime(self.reactor, Stats(Workload(name="app", namespace="default")),
                               AccessLog(self.log_out, flush_interval=0.0), "sidecar~authz")
        self.runtime.apply(config)
        sock = sockets.listener("127.0.0.1", 0, reuseport=False)
        self.port: int = sock.getsockname()[1]
        self.listener = SidecarListener(self.runtime, sock, "inbound", explicit_port=app_port,
                                        http_factory=HttpConnection)
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()

    def on_loop(self, fn: Any) -> Any:
        return run_on(self.reactor, fn)

    def metrics(self) -> dict[str, Any]:
        text = self.on_loop(self.runtime.stats.render)
        return {f.name: f for f in text_string_to_metric_families(text)}

    def log_lines(self) -> list[dict[str, Any]]:
        self.on_loop(self.runtime.access_log.flush)
        return [json.loads(line) for line in self.log_out.getvalue().splitlines() if line]

    def close(self) -> None:
        def stop() -> None:
            self.listener.close()
            for fwd in list(self.listener.connections):
                fwd.reject("-")
            state = http_state(self.runtime)
            for conn in list(state.connections):
                conn._close()
            state.upstreams.close_all()

        with contextlib.suppress(Exception):
            self.on_loop(stop)
        self.reactor.stop()
        self.thread.join(5)


@pytest.fixture
def app() -> Iterator[Backend]:
    backend = Backend(name=b"app")
    yield backend
    backend.close()


@pytest.fixture
def echo_app() -> Iterator[TcpBackend]:
    backend = TcpBackend(echo)
    yield backend
    backend.close()


@contextlib.contextmanager
def sidecar(config: dict[str, Any], app_port: int) -> Iterator[Sidecar]:
    proxy = Sidecar(config, app_port)
    try:
        yield proxy
    finally:
        proxy.close()


def requests_by_code(proxy: Sidecar) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for s in proxy.metrics()["istio_requests"].samples:
        if s.name == "istio_requests_total" and s.labels["destination_service"] == SERVICE:
            k = (s.labels["response_code"], s.labels["response_flags"])
            out[k] = out.get(k, 0) + s.value
    return out


def test_denied_requests_get_403_rbac_and_allowed_ones_reach_the_app(app: Backend) -> None:
    policies = [deny("no-admin", op(paths=["/admin*"])),
                allow("reads-from-loopback", {"from": [{"source": {"ipBlocks": ["127.0.0.0/8"]}}],
                                              "to": [{"operation": {"methods": ["GET", "POST"]}}]})]
    with sidecar(inbound_config(app.port, "HTTP", policies), app.port) as proxy:
        client = Client(proxy.port)
        try:
            assert client.request("GET", "/items").status == 200
            denied = client.request("GET", "/admin/users")
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            assert denied.headers[b"content-type"] == b"text/plain"
            # a denied request with a body: answered, the body skipped, the connection kept
            denied = client.request("POST", "/admin", body=b"x" * 1000)
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            assert client.request("DELETE", "/items").status == 403  # no ALLOW policy matches
            ok = client.request("POST", "/items?x=1", body=b"new")
            assert (ok.status, ok.body) == (200, b"app")
        finally:
            client.close()
        assert [(s.method, s.target) for s in app.seen] == [(b"GET", b"/items"), (b"POST", b"/items?x=1")]

        assert requests_by_code(proxy) == {("200", "-"): 2, ("403", "RBAC"): 3}
        logged = [(line["path"], line["response_code"], line["response_flags"]) for line in proxy.log_lines()]
        assert logged == [("/items", 200, "-"), ("/admin/users", 403, "RBAC"), ("/admin", 403, "RBAC"),
                          ("/items", 403, "RBAC"), ("/items?x=1", 200, "-")]


def test_policies_follow_config_swaps_and_a_custom_policy_is_refused(app: Backend) -> None:
    with sidecar(inbound_config(app.port, "HTTP", []), app.port) as proxy:
        client = Client(proxy.port)
        try:
            assert client.request("GET", "/a").status == 200
            proxy.on_loop(lambda: proxy.runtime.apply(
                inbound_config(app.port, "HTTP", [deny("no-a", op(paths=["/a"]))], "v2")))
            assert client.request("GET", "/a").status == 403  # same keep-alive connection, new config
            assert client.request("GET", "/b").status == 200
            with pytest.raises(ConfigError, match="CUSTOM needs the external authorization provider"):
                proxy.on_loop(lambda: proxy.runtime.apply(inbound_config(app.port, "HTTP", [CUSTOM], "v3")))
            assert proxy.runtime.snapshot.version == "v2"
            assert client.request("GET", "/a").status == 403  # v2 still in force
            proxy.on_loop(lambda: proxy.runtime.apply(inbound_config(app.port, "HTTP", [], "v4")))
            assert client.request("GET", "/a").status == 200
        finally:
            client.close()


def test_audit_policies_log_and_let_the_request_through(app: Backend) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("zmesh.proxy.authz")
    logger.addHandler(handler)
    try:
        config = inbound_config(app.port, "HTTP", [audit("watch", op(paths=["/secret*"]))])
        with sidecar(config, app.port) as proxy:
            client = Client(proxy.port)
            try:
                assert client.request("GET", "/secret/1").status == 200
                assert client.request("GET", "/public").status == 200
            finally:
                client.close()
    finally:
        logger.removeHandler(handler)
    fields = [r.fields for r in records if r.getMessage() == "audit"]  # type: ignore[attr-defined]
    assert len(fields) == 1
    assert fields[0]["policy"] == "default/watch" and fields[0]["path"] == "/secret/1"
    assert fields[0]["proxy"] == "sidecar~authz"


@pytest.mark.parametrize(("principal", "status"), [
    ("spiffe://cluster.local/ns/default/sa/sleep", 200),
    ("spiffe://cluster.local/ns/ops/sa/sleep", 403),
    ("", 403),  # plain text: no identity
])
def test_the_connections_principal_is_what_policies_see(app: Backend, principal: str, status: int) -> None:
    config = inbound_config(app.port, "HTTP", [allow("sleep", {"from": [{"source": {
        "principals": ["cluster.local/ns/default/sa/sleep"]}}]})])
    proxy = HttpProxy(config, inbound_cluster=f"inbound|{app.port}||", principal=principal)
    try:
        client = Client(proxy.port)
        try:
            assert client.request("GET", "/").status == status
        finally:
            client.close()
    finally:
        proxy.close()


def tcp_exchange(port: int, payload: bytes) -> bytes:
    """Send, half-close, read to EOF: the echo comes back, or b"" when the proxy closed at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def tcp_by_flag(proxy: Sidecar, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in proxy.metrics()[family].samples:
        if s.name == family + "_total" and s.labels["destination_service"] == SERVICE:
            out[s.labels["response_flags"]] = out.get(s.labels["response_flags"], 0) + s.value
    return out


@pytest.mark.parametrize(("policies", "allowed"), [
    ([], True),
    ([allow("loopback", {"from": [{"source": {"ipBlocks": ["127.0.0.0/8"]}}]})], True),
    ([allow("elsewhere", {"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]})], False),
    ([deny("loopback", {"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]})], False),
    ([allow("get-only", op(methods=["GET"]))], False),  # HTTP-only fields: no match at L4 for ALLOW
    ([deny("no-delete", op(methods=["DELETE"]))], False),  # ... and a match for DENY
    ([deny("no-delete-elsewhere", op(methods=["DELETE"], notPorts=["{port}"]))], True),
])
def test_tcp_connections_are_closed_when_denied(echo_app: TcpBackend, policies: list[dict[str, Any]],
                                                allowed: bool) -> None:
    policies = json.loads(json.dumps(policies).replace("{port}", str(echo_app.port)))
    with sidecar(inbound_config(echo_app.port, "TCP", policies), echo_app.port) as proxy:
        got = tcp_exchange(proxy.port, b"hello")
        if allowed:
            assert got == b"hello"
            assert echo_app.accepted == 1
        else:
            assert got == b""
            assert wait_for(lambda: tcp_by_flag(proxy, "istio_tcp_connections_closed") == {"RBAC": 1}, 5)
            assert tcp_by_flag(proxy, "istio_tcp_connections_opened") == {"RBAC": 1}
            assert echo_app.accepted == 0


# --- the proxy process: a CUSTOM policy is NACKed ------------------------------------------------

class ProxyProcess:
    """`meshctl proxy` in explicit mode, one worker, its inbound listener standing for the app port."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.path = tmp / "proxy.json"
        self.path.write_text(json.dumps(config))
        self.admin, self.stats, self.inbound = free_port(), free_port(), free_port()
        self.log = (tmp / "proxy.log").open("wb")
        self.proc = subprocess.Popen(
            [*MESHCTL, "proxy", "--id", "app-1", "--namespace", "default", "--labels", "app=app",
             "--config", str(self.path), "--mode", "explicit", "--workers", "1", "--inbound-port",
             str(self.inbound), "--admin-port", str(self.admin), "--stats-port", str(self.stats),
             "--no-access-log"], stderr=self.log)

    def get(self, path: str, port: int) -> tuple[int, str]:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> bool:
        try:
            return self.get("/ready", self.admin)[0] == 200
        except OSError:
            return False

    def dump(self) -> dict[str, Any]:
        return json.loads(self.get("/config_dump", self.admin)[1])

    def reload(self, config: dict[str, Any]) -> None:
        import signal
        self.path.write_text(json.dumps(config))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        finally:
            self.log.close()


def test_the_proxy_nacks_a_custom_policy_and_keeps_enforcing_the_last_good_one(tmp_path: Path,
                                                                               app: Backend) -> None:
    proxy = ProxyProcess(tmp_path, inbound_config(app.port, "HTTP", [deny("no-a", op(paths=["/a"]))]))
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        assert wait_for(lambda: _connects(proxy.inbound), timeout=10)
        client = Client(proxy.inbound)
        try:
            assert client.request("GET", "/a").status == 403
            assert client.request("GET", "/b").status == 200
            proxy.reload(inbound_config(app.port, "HTTP", [CUSTOM], "v2"))
            assert wait_for(lambda: proxy.dump()["last_rejected"], timeout=10)
            dump = proxy.dump()
            assert dump["version"] == "v1" and dump["last_rejected"]["version"] == "v2"
            assert "action CUSTOM needs the external authorization provider 'ext-authz'" in \
                dump["last_rejected"]["error"]
            denied = client.request("GET", "/a")
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        finally:
            client.close()
        status, text = proxy.get("/metrics", proxy.stats)
        assert status == 200
        samples = [s for f in text_string_to_metric_families(text) if f.name == "istio_requests"
                   for s in f.samples if s.name == "istio_requests_total"]
        by_code = {(s.labels["response_code"], s.labels["response_flags"]): s.value for s in samples
                   if s.labels["destination_service"] == SERVICE}
        assert by_code == {("403", "RBAC"): 2, ("200", "-"): 1}
        assert all(s.labels["reporter"] == "destination" for s in samples)
    finally:
        proxy.stop()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --- identities from mutual TLS (the inbound listener terminating it, as the worker builds it) -----

INTRUDER_ID = "spiffe://cluster.local/ns/other/sa/intruder"


@pytest.fixture
def mtls(tmp_path: Path) -> dict[str, Path]:
    """A server and two client identities issued by one citadel CA; "roots" is the trust bundle."""
    ca = Ca()
    for who, spiffe in (("server", SERVER_ID), ("client", CLIENT_ID), ("intruder", INTRUDER_ID)):
        ca.issue(tmp_path / who, spiffe)
    return {"server": tmp_path / "server", "client": tmp_path / "client", "intruder": tmp_path / "intruder",
            "roots": tmp_path / "server" / "root-cert.pem"}


def mtls_config(port: int, protocol: str, policies: list[dict[str, Any]]) -> dict[str, Any]:
    config = server_config({port: protocol}, "PERMISSIVE")
    config["security"]["authorization"] = policies
    return config


def test_principals_from_mutual_tls_decide_http_requests(mtls: dict[str, Path], app: Backend) -> None:
    policies = [allow("clients", {"from": [{"source": {
        "principals": ["cluster.local/ns/default/sa/client"]}}]})]
    side = Side(mtls_config(app.port, "HTTP", policies), mtls["server"], name="server", inbound=(app.port,))
    try:
        port = side.port("inbound", app.port)
        answer, _ = tls_get(port, tls_client(mtls["client"], mtls["roots"]), "/mine")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        answer, _ = tls_get(port, tls_client(mtls["intruder"], mtls["roots"]), "/mine")
        assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(b"RBAC: access denied"), answer
        plain = Client(port)  # PERMISSIVE: plain text has no principal
        try:
            assert plain.request("GET", "/mine").status == 403
        finally:
            plain.close()
        assert [s.target for s in app.seen] == [b"/mine"]
        denied = {s["source_principal"]: s["count"] for s in side.series()
                  if s["response_flags"] == "RBAC" and s["destination_service"] == MTLS_SERVICE}
        assert denied == {INTRUDER_ID: 1, "unknown": 1}
    finally:
        side.close()


def test_namespaces_from_mutual_tls_decide_tcp_connections(mtls: dict[str, Path],
                                                           echo_app: TcpBackend) -> None:
    policies = [deny("no-other", {"from": [{"source": {"namespaces": ["other"]}}]})]
    side = Side(mtls_config(echo_app.port, "TCP", policies), mtls["server"], name="server",
                inbound=(echo_app.port,))
    try:
        port = side.port("inbound", echo_app.port)

        def exchange(who: str) -> bytes:
            ctx = tls_client(mtls[who], mtls["roots"])
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
                out = b""
                with contextlib.suppress(OSError):
                    s.sendall(b"ping")
                    while len(out) < 4 and (chunk := s.recv(100)):
                        out += chunk
                return out

        assert exchange("client") == b"ping"
        assert exchange("intruder") == b""
        assert echo_app.accepted == 1
        closed = {s["source_principal"]: s["count"] for s in side.series("tcp")
                  if s["response_flags"] == "RBAC"}
        assert closed == {INTRUDER_ID: 1}
    finally:
        side.close()
