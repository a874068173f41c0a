"""Istio mutual TLS between sidecars (dataplane/proxy/tls.py): real certificates issued by citadel's
pki module and written by the node agent's CertDir, real sockets on loopback, sidecars in-process on a
reactor thread (listeners as the worker builds them) or as `meshctl proxy --certs` processes, and the
openssl CLI where it checks the claim."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.citadel import pki
from dataplane.proxy import sockets
from dataplane.proxy.accesslog import AccessLog
from dataplane.proxy.http.server import HttpConnection
from dataplane.proxy.http.state import http_state
from dataplane.proxy.listeners import SidecarListener, looks_like_http, looks_like_tls
from dataplane.proxy.reactor import Reactor
from dataplane.proxy.runtime import Runtime
from dataplane.proxy.stats import LABELS, TCP_LABELS, Stats, Workload
from dataplane.proxy.tls import CertError, WorkloadCerts
from nodeagent.certs import CertDir, CertSet
from tests.conftest import MESHCTL, free_port, wait_for
from tests.proxy.backends import Backend as TcpBackend
from tests.proxy.backends import echo, run_on
from tests.proxy.l7helpers import Backend, Client, reply, request_bytes
from tests.proxy.test_sidecar import Proxy, tcp_config, try_get

TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/server"
SERVICE = "server.prod.svc.cluster.local"


# --- certificates -----------------------------------------------------------------------------
class Ca:
    """A citadel root CA (pki.new_root + SigningCa, no bus) issuing workload certificates."""

    def __init__(self) -> None:
        cert, key = pki.new_root(TD, time.time())
        self.ca = pki.SigningCa(cert, key)
        self.root_pem = pki.pem(cert)

    def issue(self, directory: Path, spiffe: str, *, not_before: float | None = None,
              not_after: float | None = None, roots: list[str] | None = None) -> x509.Certificate:
        """Write `directory` as the node agent does (key, chain, roots, version last); the leaf."""
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        now = time.time()
        _, leaf = self.ca.issue(spki, spiffe, now - 60 if not_before is None else not_before,
                                now + 3600 if not_after is None else not_after)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        CertDir(directory.parent, directory.name, (os.getuid(), os.getgid())).write(
            CertSet(key_pem, [leaf], roots or [self.root_pem]))
        return x509.load_pem_x509_certificate(leaf.encode())


# --- configs (pilot's schema) -----------------------------------------------------------------
def _endpoint(port: int, **extra: Any) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "weight": 1, "locality": "", "healthy": True, "labels": {},
            "service_account": "", "tls_mode": "disabled", **extra}


def server_config(apps: dict[int, str], mode: str) -> dict[str, Any]:
    """Inbound listeners for the workload's ports {port: protocol}, all in mTLS `mode`."""
    inbound, clusters, endpoints = [], {}, {}
    for port, protocol in apps.items():
        name = f"inbound|{port}||"
        inbound.append({"name": f"inbound_{port}", "port": port, "protocol": protocol, "mtls_mode": mode,
                        "cluster": name, "services": [{"service": SERVICE, "port": port}]})
        clusters[name] = {"name": name, "direction": "inbound", "port": port, "type": "STATIC",
                          "connection_pool": {"tcp": {"connect_timeout_ms": 2000}}}
        endpoints[name] = [_endpoint(port)]
    return {"version": "v1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [],
                                           "inbound": inbound},
            "routes": {}, "clusters": clusters, "endpoints": endpoints,
            "security": {"mtls": {"mode": mode, "ports": {}}, "authorization": []}}


def client_config(services: dict[int, tuple[str, int]], tls: dict[str, Any] | None,
                  endpoint_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Outbound services {service port: (protocol, server sidecar port)}, each an ISTIO_MUTUAL cluster
    (with `tls`) to the server sidecar."""
    outbound, clusters, endpoints, routes = [], {}, {}, {}
    for port, (protocol, upstream) in services.items():
        cluster = f"outbound|{port}||{SERVICE}"
        listener: dict[str, Any] = {"name": f"{SERVICE}_{port}", "service": SERVICE, "addresses": [],
                                    "port": port, "protocol": protocol}
        if protocol == "HTTP":
            listener["route_config"] = str(port)
            route = {"name": "default", "match": {}, "clusters": [{"name": cluster, "weight": 100}],
                     "retries": {"attempts": 2, "per_try_timeout_ms": 0, "retry_on": ["connect-failure"],
                                 "retriable_status_codes": []}}
            routes[str(port)] = {"name": str(port), "virtual_hosts": [
                {"name": f"{SERVICE}:{port}", "service": SERVICE, "domains": ["*"], "routes": [route]}]}
        else:
            listener["tcp_routes"] = [{"match": {}, "clusters": [{"name": cluster, "weight": 100}]}]
        outbound.append(listener)
        clusters[cluster] = {"name": cluster, "direction": "outbound", "type": "EDS", "service": SERVICE,
                             "port": port, "connection_pool": {"tcp": {"connect_timeout_ms": 2000}},
                             **({"tls": tls} if tls else {})}
        endpoints[cluster] = [_endpoint(upstream, **(endpoint_extra or {}))]
    return {"version": "v1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": outbound,
                                           "inbound": []},
            "routes": routes, "clusters": clusters, "endpoints": endpoints}


MUTUAL = {"mode": "ISTIO_MUTUAL", "subject_alt_names": [SERVER_ID]}


# --- an in-process sidecar ----------------------------------------------------------------------
class Side:
    """A Runtime on a reactor thread with the worker's listeners in explicit mode: one inbound
    listener per workload port in `inbound`, one outbound listener per service port in `outbound`."""

    def __init__(self, config: dict[str, Any], certs: Path | None, *, name: str,
                 inbound: tuple[int, ...] = (), outbound: tuple[int, ...] = ()) -> None:
        self.certs = WorkloadCerts(certs) if certs is not None else None
        principal = ""
        if self.certs is not None:
            self.certs.load()
            principal = self.certs.principal
        self.reactor = Reactor()
        local = Workload(name=name, namespace="default", principal=principal)
        self.runtime = Runtime(self.reactor, Stats(local), AccessLog(io.StringIO(), flush_interval=0.0),
                               f"sidecar~{name}")
        self.runtime.apply(config)
        http_state(self.runtime).upstreams.certs = self.certs
        self.ports: dict[tuple[str, int], int] = {}
        self.listeners: list[SidecarListener] = []
        for direction, ports in (("inbound", inbound), ("outbound", outbound)):
            for port in ports:
                sock = sockets.listener("127.0.0.1", 0, reuseport=False)
                self.ports[direction, port] = sock.getsockname()[1]
                self.listeners.append(SidecarListener(self.runtime, sock, direction, explicit_port=port,
                                                      http_factory=HttpConnection, certs=self.certs))
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()

    def port(self, direction: str, port: int) -> int:
        return self.ports[direction, port]

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        return run_on(self.reactor, fn)

    def series(self, kind: str = "requests") -> list[dict[str, Any]]:
        """Metric series as {label: value, "count": n} (requests; or tcp: connections closed)."""
        snap = self.on_loop(self.runtime.stats.snapshot)
        names = LABELS if kind == "requests" else TCP_LABELS
        return [{**dict(zip(names, labels, strict=True)), "count": values[0 if kind == "requests" else 1]}
                for labels, values in snap[kind]]

    def close(self) -> None:
        def stop() -> None:
            for listener in self.listeners:
                listener.close()
                listener.sock.close()
            state = http_state(self.runtime)
            for conn in list(state.connections):
                conn._close()
            state.upstreams.close_all()

        with contextlib.suppress(Exception):
            self.on_loop(stop)
        self.reactor.stop()
        self.thread.join(5)


@pytest.fixture
def ca() -> Ca:
    return Ca()


@pytest.fixture
def app() -> Iterator[Backend]:
    b = Backend(lambda _c, seen: reply(200, b"hello " + seen.target))
    yield b
    b.close()


def tls_client(directory: Path | None, roots: Path) -> ssl.SSLContext:
    """What a peer sidecar (or a test client) offers: TLS 1.3, the workload cert, the trust bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(roots)
    if directory is not None:
        ctx.load_cert_chain(directory / "cert-chain.pem", directory / "key.pem")
    return ctx


def tls_get(port: int, ctx: ssl.SSLContext, path: str = "/") -> tuple[bytes, ssl.SSLSocket]:
    """One HTTP/1.1 request over TLS; (whole answer up to the close, the socket for getpeercert)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw)
    s.sendall(request_bytes("GET", path, headers=[("Connection", "close")]))
    out = b""
    with contextlib.suppress(ssl.SSLEOFError):
        while chunk := s.recv(65536):
            out += chunk
    s.close()
    return out, s


def s_client(port: int, directory: Path | None, roots: Path, request: bytes,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile", str(roots),
            "-quiet", *extra]
    if directory is not None:
        args += ["-cert", str(directory / "cert-chain.pem"), "-key", str(directory / "key.pem")]
    return subprocess.run(args, input=request, capture_output=True, timeout=20)


# --- inbound ------------------------------------------------------------------------------------

def test_peeked_prefixes_tell_tls_and_http_apart_or_ask_for_more() -> None:
    assert looks_like_tls(b"\x16") is None
    assert looks_like_tls(b"\x16\x03") is True and looks_like_tls(b"\x16\x03\x01\x02") is True
    assert looks_like_tls(b"GE") is False and looks_like_tls(b"\x16\x02") is False
    assert looks_like_http(b"GE") is None and looks_like_http(b"GET /") is True
    assert looks_like_http(b"\x16\x03") is False

def test_strict_port_needs_a_mesh_client_certificate(tmp_path: Path, ca: Ca, app: Backend,
                                                     sides: list[Side]) -> None:
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    roots = tmp_path / "server" / "root-cert.pem"
    side = Side(server_config({app.port: "HTTP"}, "STRICT"), tmp_path / "server", name="server",
                inbound=(app.port,))
    sides.append(side)
    port = side.port("inbound", app.port)
    req = request_bytes("GET", "/strict", headers=[("Connection", "close")])

    anonymous = s_client(port, None, roots, req)
    assert b"HTTP/1.1" not in anonymous.stdout
    assert app.seen == []

    plain = Client(port)
    plain.send(req)
    assert plain.closed(), "a plain-text client must not get through a STRICT port"
    plain.close()

    mesh = s_client(port, tmp_path / "client", roots, req)
    assert b"HTTP/1.1 200" in mesh.stdout and b"hello /strict" in mesh.stdout, mesh.stderr
    assert [s.target for s in app.seen] == [b"/strict"]
    got = [s for s in side.series() if s["count"]]
    assert got and got[0]["source_principal"] == CLIENT_ID and got[0]["destination_principal"] == SERVER_ID
    assert got[0]["connection_security_policy"] == "mutual_tls"
    assert got[0]["source_workload_namespace"] == "default"  # from the SPIFFE id


def test_foreign_ca_and_expired_client_certificates_are_refused(tmp_path: Path, ca: Ca, app: Backend,
                                                                sides: list[Side]) -> None:
    ca.issue(tmp_path / "server", SERVER_ID)
    foreign = Ca()
    foreign.issue(tmp_path / "foreign", CLIENT_ID, roots=[ca.root_pem])  # trusts us, is not trusted
    now = time.time()
    ca.issue(tmp_path / "expired", CLIENT_ID, not_before=now - 7200, not_after=now - 3600)
    roots = tmp_path / "server" / "root-cert.pem"
    side = Side(server_config({app.port: "HTTP"}, "STRICT"), tmp_path / "server", name="server",
                inbound=(app.port,))
    sides.append(side)
    port = side.port("inbound", app.port)
    req = request_bytes("GET", "/x", headers=[("Connection", "close")])
    for who in ("foreign", "expired"):
        out = s_client(port, tmp_path / who, roots, req)
        assert b"HTTP/1.1" not in out.stdout, who
        with pytest.raises((ssl.SSLError, ConnectionError)):
            answer, _ = tls_get(port, tls_client(tmp_path / who, roots))
            assert answer == b""
            raise ConnectionError("closed without an answer")
    assert app.seen == []


def test_permissive_port_takes_plain_text_and_mtls(tmp_path: Path, ca: Ca, app: Backend,
                                                  sides: list[Side]) -> None:
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    roots = tmp_path / "server" / "root-cert.pem"
    side = Side(server_config({app.port: "HTTP"}, "PERMISSIVE"), tmp_path / "server", name="server",
                inbound=(app.port,))
    sides.append(side)
    port = side.port("inbound", app.port)
    plain = Client(port)
    assert plain.request(path="/plain").body == b"hello /plain"
    plain.close()
    mesh = s_client(port, tmp_path / "client", roots, request_bytes("GET", "/tls", headers=[("Connection",
                                                                                            "close")]))
    assert b"hello /tls" in mesh.stdout, mesh.stderr
    answer, _ = tls_get(port, tls_client(tmp_path / "client", roots), "/py")
    assert b"hello /py" in answer
    by_policy = {(s["connection_security_policy"], s["source_principal"]): s["count"] for s in side.series()}
    assert by_policy == {("none", "unknown"): 1, ("mutual_tls", CLIENT_ID): 2}


def test_strict_port_without_certificates_refuses(app: Backend, sides: list[Side]) -> None:
    side = Side(server_config({app.port: "HTTP"}, "STRICT"), None, name="server", inbound=(app.port,))
    sides.append(side)
    plain = Client(side.port("inbound", app.port))
    plain.send(request_bytes("GET", "/"))
    assert plain.closed()
    assert app.seen == []


# --- two sidecars -------------------------------------------------------------------------------
def test_two_sidecars_carry_http_and_tcp_over_mtls(tmp_path: Path, ca: Ca, app: Backend,
                                                   sides: list[Side]) -> None:
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    big = os.urandom(1 << 20)  # many TLS records, and past the engine's splice threshold
    bulk = Backend(lambda _c, seen: reply(200, big if seen.target == b"/big" else seen.body))
    tcp_app = TcpBackend(echo)
    try:
        server = Side(server_config({bulk.port: "HTTP", tcp_app.port: "TCP"}, "STRICT"), tmp_path / "server",
                      name="server", inbound=(bulk.port, tcp_app.port))
        sides.append(server)
        http_port, tcp_port = free_port(), free_port()
        client = Side(client_config({http_port: ("HTTP", server.port("inbound", bulk.port)),
                                     tcp_port: ("TCP", server.port("inbound", tcp_app.port))}, MUTUAL),
                      tmp_path / "client", name="client", outbound=(http_port, tcp_port))
        sides.append(client)
        c = Client(client.port("outbound", http_port), timeout=10)
        for _ in range(2):
            assert c.request(path="/big").body == big
        upload = os.urandom(300_000)
        assert c.request("POST", "/up", body=upload).body == upload
        assert c.request("POST", "/small", body=b"first").body == b"first"
        opened = bulk.accepted
        for i in range(5):  # keep-alive on both hops: no new connection (no new handshake)
            assert c.request("POST", "/small", body=b"%d" % i).body == b"%d" % i
        assert bulk.accepted == opened
        c.close()
        with socket.create_connection(("127.0.0.1", client.port("outbound", tcp_port)), timeout=10) as s:
            payload = os.urandom(500_000)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got == payload

        assert wait_for(lambda: any(x["count"] for x in server.series("tcp")))
        dest = [s for s in server.series() if s["count"]]
        assert {(s["source_principal"], s["destination_principal"], s["connection_security_policy"])
                for s in dest} == {(CLIENT_ID, SERVER_ID, "mutual_tls")}
        assert sum(s["count"] for s in dest) == 9
        src = [s for s in client.series() if s["count"]]
        assert {(s["source_principal"], s["destination_principal"], s["destination_workload_namespace"])
                for s in src} == {(CLIENT_ID, SERVER_ID, "prod")}
        tcp_dest = [s for s in server.series("tcp") if s["count"]]
        assert [(s["source_principal"], s["connection_security_policy"]) for s in tcp_dest] == [
            (CLIENT_ID, "mutual_tls")]
    finally:
        bulk.close()
        tcp_app.close()


def test_slow_readers_push_back_through_tls_without_losing_bytes(tmp_path: Path, ca: Ca,
                                                                 sides: list[Side]) -> None:
    """Bodies far past the socket buffers, read slowly: TLS writes would block (OpenSSL keeps the
    record, the engine offers the same bytes again) on every hop, and every byte arrives."""
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    big = os.urandom(8 << 20)
    bulk = Backend(lambda _c, seen: reply(200, big if seen.target == b"/big" else
                                          hashlib.sha256(seen.body).hexdigest().encode()))
    tcp_app = TcpBackend(echo)
    try:
        server = Side(server_config({bulk.port: "HTTP", tcp_app.port: "TCP"}, "STRICT"), tmp_path / "server",
                      name="server", inbound=(bulk.port, tcp_app.port))
        sides.append(server)
        http_port, tcp_port = free_port(), free_port()
        client = Side(client_config({http_port: ("HTTP", server.port("inbound", bulk.port)),
                                     tcp_port: ("TCP", server.port("inbound", tcp_app.port))}, MUTUAL),
                      tmp_path / "client", name="client", outbound=(http_port, tcp_port))
        sides.append(client)
        with socket.create_connection(("127.0.0.1", client.port("outbound", http_port)), timeout=20) as s:
            s.sendall(request_bytes("GET", "/big"))
            got = _slow_read(s, len(big) + len(reply(200, b"")))
            assert got.split(b"\r\n\r\n", 1)[1] == big
            upload = os.urandom(8 << 20)
            s.sendall(request_bytes("POST", "/up", body=upload))
            assert hashlib.sha256(upload).hexdigest().encode() in s.recv(65536)
        with socket.create_connection(("127.0.0.1", client.port("outbound", tcp_port)), timeout=20) as t:
            payload = os.urandom(6 << 20)

            def send() -> None:
                t.sendall(payload)
                t.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=send, daemon=True)
            writer.start()
            assert _slow_read(t, len(payload)) == payload
            writer.join(10)
    finally:
        bulk.close()
        tcp_app.close()


def _slow_read(sock: socket.socket, size: int) -> bytes:
    """Read `size` bytes (or to EOF), pausing after each MiB so every buffer on the way fills up."""
    got = bytearray()
    mark = 1 << 20
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
        if len(got) >= mark:
            mark += 1 << 20
            time.sleep(0.05)
    return bytes(got)


def test_wrong_server_identity_and_foreign_ca_fail_with_uf(tmp_path: Path, ca: Ca, app: Backend,
                                                          sides: list[Side],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    foreign = Ca()
    foreign.issue(tmp_path / "stranger", CLIENT_ID)  # trusts only its own CA
    server = Side(server_config({app.port: "HTTP"}, "STRICT"), tmp_path / "server", name="server",
                  inbound=(app.port,))
    sides.append(server)
    upstream = server.port("inbound", app.port)
    wrong_id = f"spiffe://{TD}/ns/prod/sa/payments"
    http_port, tcp_port = free_port(), free_port()
    wrong = Side(client_config({http_port: ("HTTP", upstream), tcp_port: ("TCP", upstream)},
                               {"mode": "ISTIO_MUTUAL", "subject_alt_names": [wrong_id]}),
                 tmp_path / "client", name="client", outbound=(http_port, tcp_port))
    sides.append(wrong)
    with caplog.at_level(logging.WARNING, logger="zmesh"):
        c = Client(wrong.port("outbound", http_port))
        assert c.request(path="/").status == 503
        c.close()
        tcp = Client(wrong.port("outbound", tcp_port))
        tcp.send(b"ping")
        assert tcp.closed()
        tcp.close()
    lines = [r.fields for r in caplog.records if r.getMessage() == "upstream refused over mutual TLS"]
    assert lines and all((f["expected"], f["presented"], f["error"]) == (wrong_id, SERVER_ID, "SAN mismatch")
                         for f in lines)
    flags = {(s["response_code"], s["response_flags"]) for s in wrong.series() if s["count"]}
    assert flags == {("503", "UF,URX")} or flags == {("503", "UF")}
    assert wait_for(lambda: [s["response_flags"] for s in wrong.series("tcp") if s["count"]] == ["UF"])

    stranger = Side(client_config({http_port + 0: ("HTTP", upstream)}, MUTUAL), tmp_path / "stranger",
                    name="stranger", outbound=(http_port,))
    sides.append(stranger)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zmesh"):
        c = Client(stranger.port("outbound", http_port))
        assert c.request(path="/").status == 503
        c.close()
    failed = [r.fields for r in caplog.records if r.getMessage() == "upstream refused over mutual TLS"]
    assert failed and failed[0]["presented"] == "-" and "CERTIFICATE_VERIFY_FAILED" in failed[0]["error"]

    # a client certificate from a foreign CA (the client trusts the server): TLS 1.3 completes the
    # client's handshake before the server refuses; the confirmed handshake still makes it UF
    foreign.issue(tmp_path / "refused", CLIENT_ID, roots=[ca.root_pem])
    refused = Side(client_config({http_port: ("HTTP", upstream), tcp_port: ("TCP", upstream)}, MUTUAL),
                   tmp_path / "refused", name="refused", outbound=(http_port, tcp_port))
    sides.append(refused)
    c = Client(refused.port("outbound", http_port))
    assert c.request(path="/").status == 503
    c.close()
    tcp = Client(refused.port("outbound", tcp_port))
    tcp.send(b"ping")
    assert tcp.closed()
    tcp.close()
    flags = {s["response_flags"] for s in refused.series() if s["count"]}
    assert flags and flags <= {"UF", "UF,URX"}
    assert wait_for(lambda: [s["response_flags"] for s in refused.series("tcp") if s["count"]] == ["UF"])
    assert app.seen == []


def test_auto_mtls_only_to_istio_endpoints_and_plain_without_certs(tmp_path: Path, ca: Ca, app: Backend,
                                                                   sides: list[Side]) -> None:
    """`auto`: an endpoint whose tls_mode is "disabled" gets plain text; ISTIO_MUTUAL without
    certificates falls back to plain text too."""
    http_port = free_port()
    ca.issue(tmp_path / "client", CLIENT_ID)
    auto = Side(client_config({http_port: ("HTTP", app.port)}, {"mode": "ISTIO_MUTUAL", "auto": True}),
                tmp_path / "client", name="client", outbound=(http_port,))
    sides.append(auto)
    c = Client(auto.port("outbound", http_port))
    assert c.request(path="/auto").body == b"hello /auto"
    c.close()
    bare = Side(client_config({http_port: ("HTTP", app.port)}, MUTUAL), None, name="bare",
                outbound=(http_port,))
    sides.append(bare)
    c = Client(bare.port("outbound", http_port))
    assert c.request(path="/bare").body == b"hello /bare"
    c.close()


# --- certificates on disk -----------------------------------------------------------------------
def test_cert_dir_errors_are_clear_and_keep_what_is_in_force(tmp_path: Path, ca: Ca) -> None:
    with pytest.raises(CertError, match=r"cannot read .*version"):
        WorkloadCerts(tmp_path / "missing").load()
    ca.issue(tmp_path / "w", SERVER_ID)
    certs = WorkloadCerts(tmp_path / "w")
    assert certs.maybe_reload() and certs.principal == SERVER_ID
    old = certs.server
    (tmp_path / "w" / "key.pem").write_text("not a key")
    (tmp_path / "w" / "version").write_text("broken\n")
    assert not certs.maybe_reload()
    assert certs.server is old and certs.principal == SERVER_ID
    with pytest.raises(CertError, match="unusable certificates"):
        certs.load()


def test_sidecar_process_reloads_certificates_without_failing_requests(tmp_path: Path, ca: Ca,
                                                                        app: Backend) -> None:
    """`meshctl proxy --certs`: the worker's tick swaps the contexts when `version` changes; a stream
    of requests (new TLS connections each) sees no failure, new connections get the new cert, and a
    keep-alive connection opened before carries on."""
    certs = tmp_path / "certs" / "server-1"
    first = ca.issue(certs, SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    roots = certs / "root-cert.pem"
    config = tmp_path / "server.json"
    config.write_text(json.dumps(server_config({app.port: "HTTP"}, "STRICT")))
    inbound, stats = free_port(), free_port()
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [*MESHCTL, "proxy", "--id", "server-1", "--namespace", "prod", "--labels", "app=server",
         "--config", str(config), "--mode", "explicit", "--workers", "1", "--inbound-port", str(inbound),
         "--admin-port", str(free_port()), "--stats-port", str(stats), "--no-access-log",
         "--certs", str(certs)], stderr=log)
    ctx = tls_client(tmp_path / "client", roots)
    failures: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                answer, _ = tls_get(inbound, ctx, "/s")
                if b"hello /s" not in answer:
                    failures.append(answer[:80].decode(errors="replace"))
            except OSError as exc:
                failures.append(repr(exc))

    try:
        assert wait_for(lambda: _accepts(inbound), timeout=15), (tmp_path / "proxy.log").read_text()
        assert _served_serial(inbound, ctx) == first.serial_number
        kept = ctx.wrap_socket(socket.create_connection(("127.0.0.1", inbound), timeout=5))
        kept.sendall(request_bytes("GET", "/kept"))
        assert b"hello /kept" in kept.recv(65536)
        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        assert wait_for(lambda: len(app.seen) >= 5)
        second = ca.issue(certs, SERVER_ID)
        assert wait_for(lambda: _served_serial(inbound, ctx) == second.serial_number, timeout=10)
        seen = len(app.seen)
        assert wait_for(lambda: len(app.seen) >= seen + 5)
        stop.set()
        worker.join(10)
        assert failures == []
        kept.sendall(request_bytes("GET", "/kept-after"))
        assert b"hello /kept-after" in kept.recv(65536)
        assert x509.load_der_x509_certificate(kept.getpeercert(binary_form=True)).serial_number == \
            first.serial_number
        kept.close()
        text = _scrape(stats)
        assert f'source_principal="{CLIENT_ID}"' in text and 'connection_security_policy="mutual_tls"' in text
        assert f'destination_principal="{SERVER_ID}"' in text
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_proxy_cli_refuses_a_file_as_cert_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    done = subprocess.run([*MESHCTL, "proxy", "--id", "x", "--config", str(tmp_path / "file"),
                           "--certs", str(tmp_path / "file")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--certs" in done.stderr and "is a file" in done.stderr


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def _scrape(port: int) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_a_sidecar_is_not_ready_before_its_workers_hold_the_certificates(tmp_path: Path, ca: Ca) -> None:
    """As Envoy's listeners wait for their SDS secrets: with --certs, /ready answers NO CERTIFICATES
    until the node agent wrote them and every worker loaded them, so a proxy that said ready never
    opens plain-text connections to ISTIO_MUTUAL clusters."""
    certs = tmp_path / "certs" / "client-1"
    certs.mkdir(parents=True)
    proxy = Proxy(tmp_path, tcp_config("v1", free_port(), free_port()), "--certs", str(certs))

    def ready() -> tuple[int, str] | None:
        return try_get(f"http://127.0.0.1:{proxy.admin}/ready")

    try:
        assert wait_for(lambda: ready() == (503, "NO CERTIFICATES\n"), timeout=15), ready()
        ca.issue(certs, CLIENT_ID)
        assert wait_for(lambda: ready() == (200, "LIVE\n"), timeout=10), ready()
    finally:
        proxy.stop()
