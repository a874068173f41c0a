"""Sidecar processes (`meshctl proxy --certs`) in explicit mode with static configs in pilot's schema,
a client loop that records the outcome of every request, and a TLS probe of what a sidecar presents.

The client sidecar serves two outbound ports to the same ISTIO_MUTUAL cluster target: POOLED keeps its
upstream TLS connections alive, FRESH allows one request per upstream connection, so every request
through it is a new TLS handshake with the server sidecar's certificates in force at that moment.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MESHCTL, free_port, wait_for

SERVICE = "server.default.svc.cluster.local"


# --- configs (pilot's schema, as tests/proxy/test_mtls.py writes them) ----------------------------
def _endpoint(port: int) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "weight": 1, "locality": "", "healthy": True, "labels": {},
            "service_account": "", "tls_mode": "istio"}


def server_config(app_port: int, mode: str = "STRICT") -> dict[str, Any]:
    """One inbound HTTP listener for the workload's port, in mTLS `mode`."""
    name = f"inbound|{app_port}||"
    inbound = {"name": f"inbound_{app_port}", "port": app_port, "protocol": "HTTP", "mtls_mode": mode,
               "cluster": name, "services": [{"service": SERVICE, "port": app_port}]}
    cluster = {"name": name, "direction": "inbound", "port": app_port, "type": "STATIC",
               "connection_pool": {"tcp": {"connect_timeout_ms": 2000}}}
    return {"version": "v1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [],
                                           "inbound": [inbound]},
            "routes": {}, "clusters": {name: cluster}, "endpoints": {name: [_endpoint(app_port)]},
            "security": {"mtls": {"mode": mode, "ports": {}}, "authorization": []}}


def client_config(upstream: int, pooled: int, fresh: int, server_id: str) -> dict[str, Any]:
    """HTTP services on ports `pooled` and `fresh` (one request per upstream connection), both
    ISTIO_MUTUAL to the server sidecar's inbound port `upstream`, expecting `server_id`. No retries:
    every failed attempt reaches the client."""
    outbound, clusters, endpoints, routes = [], {}, {}, {}
    for port, per_connection in ((pooled, 0), (fresh, 1)):
        cluster = f"outbound|{port}||{SERVICE}"
        outbound.append({"name": f"{SERVICE}_{port}", "service": SERVICE, "addresses": [], "port": port,
                         "protocol": "HTTP", "route_config": str(port)})
        route = {"name": "default", "match": {}, "clusters": [{"name": cluster, "weight": 100}]}
        routes[str(port)] = {"name": str(port), "virtual_hosts": [
            {"name": f"{SERVICE}:{port}", "service": SERVICE, "domains": ["*"], "routes": [route]}]}
        pool: dict[str, Any] = {"tcp": {"connect_timeout_ms": 2000}}
        if per_connection:
            pool["http"] = {"max_requests_per_connection": per_connection}
        clusters[cluster] = {"name": cluster, "direction": "outbound", "type": "EDS", "service": SERVICE,
                             "port": port, "connection_pool": pool,
                             "tls": {"mode": "ISTIO_MUTUAL", "subject_alt_names": [server_id]}}
        endpoints[cluster] = [_endpoint(upstream)]
    return {"version": "v1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": outbound,
                                           "inbound": []},
            "routes": routes, "clusters": clusters, "endpoints": endpoints}


# --- a sidecar process --------------------------------------------------------------------------
def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Sidecar:
    """`meshctl proxy --mode explicit --certs DIR --config FILE` with one worker; stderr to a log file."""

    def __init__(self, workdir: Path, wid: str, config: dict[str, Any], certs: Path) -> None:
        self.wid = wid
        self.config = workdir / f"{wid}.json"
        self.config.write_text(json.dumps(config))
        self.log_path = workdir / f"{wid}.log"
        self.inbound_port = free_port()
        self.admin_port, self.stats_port = free_port(), free_port()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*MESHCTL, "proxy", "--id", wid, "--config", str(self.config), "--mode", "explicit",
                 "--workers", "1", "--inbound-port", str(self.inbound_port), "--admin-port",
                 str(self.admin_port), "--stats-port", str(self.stats_port), "--no-access-log",
                 "--certs", str(certs)], stderr=log, stdout=subprocess.DEVNULL)

    def wait_listening(self, port: int) -> None:
        assert wait_for(lambda: accepts(port) or self.proc.poll() is not None, timeout=20)
        assert self.proc.poll() is None and accepts(port), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def loaded(self) -> str:
        """The certificate version the sidecar's worker last loaded, from its log ("" if none)."""
        versions = re.findall(r'msg="certificates loaded" .*? version=(\S+)', self.log())
        return versions[-1] if versions else ""

    def requests(self) -> dict[tuple[str, str], float]:
        """istio_requests_total by (response_code, response_flags), as this sidecar reports it."""
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=5)) as c:
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "istio_requests_total":
                    key = (s.labels.get("response_code", ""), s.labels.get("response_flags", ""))
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- what a server presents ---------------------------------------------------------------------
def _snapshot(certs: Path, into: Path) -> None:
    """Copy a certificate directory consistently (the same `version` before and after), as a sidecar
    reads it."""
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):  # no `version`: a set is being written
            version = (certs / "version").read_bytes()
            for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
                shutil.copyfile(certs / name, into / name)
            if (certs / "version").read_bytes() == version:
                return
        time.sleep(0.02)
    raise AssertionError(f"{certs} kept changing while being read")


def presented(port: int, client_certs: Path) -> x509.Certificate:
    """The leaf certificate a STRICT port presents to a client holding `client_certs` (a new TLS 1.3
    connection verified against that workload's current trust bundle)."""
    with tempfile.TemporaryDirectory(prefix="zmesh-probe-") as tmp:
        d = Path(tmp)
        _snapshot(client_certs, d)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(d / "root-cert.pem")
        ctx.load_cert_chain(d / "cert-chain.pem", d / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# --- the client loop ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    kind: str       # "pooled" (keep-alive to the sidecar, pooled upstream) or "fresh" (new connections)
    at: float       # time.time() when the request finished (as in the sidecars' logs)
    ok: bool
    detail: str     # "200" or what went wrong


class Traffic:
    """Requests through the client sidecar from two threads until `stop` (or `limit_s`), every outcome
    recorded: "pooled" reuses one keep-alive connection, "fresh" opens a connection per request."""

    def __init__(self, pooled: int, fresh: int, expect: bytes, pause: float = 0.01,
                 limit_s: float = 60.0) -> None:
        self.expect = expect
        self.pause = pause
        self.deadline = time.monotonic() + limit_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind, port), daemon=True)
                         for kind, port in (("pooled", pooled), ("fresh", fresh))]
        for t in self._threads:
            t.start()

    def _run(self, kind: str, port: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            headers = {"Connection": "close"} if kind == "fresh" else {}
            try:
                conn.request("GET", f"/{kind}/{n}", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and body == self.expect
                detail = str(resp.status) if ok else f"{resp.status} {body[:100]!r}"
                if kind == "fresh" or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                ok, detail = False, repr(exc)
                conn.close()
                conn = None
            self.outcomes.append(Outcome(kind, time.time(), ok, detail))
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def count(self, kind: str | None = None, since: float = 0.0) -> int:
        return sum(1 for o in list(self.outcomes) if o.at >= since and (kind is None or o.kind == kind))

    def failures(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]

    def flowing(self, n: int = 5, timeout: float = 10.0) -> bool:
        """Whether both loops completed `n` more requests (each, from now) within `timeout`."""
        now = time.time()
        return wait_for(lambda: min(self.count("pooled", now), self.count("fresh", now)) >= n,
                        timeout=timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
