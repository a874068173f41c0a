"""The sidecar as a process (`meshctl proxy`): workers, config apply and NACK, admin and metrics,
and following pilot over the bus. Real processes and sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.proxy.control import MAX_FRAME, FrameError, FrameReader, frame
from tests.conftest import MESHCTL, free_port, wait_for
from tests.proxy.backends import Backend, text_server
from tests.proxy.backends import echo as echo_back


def test_control_frames_round_trip_and_refuse_garbage() -> None:
    reader = FrameReader()
    data = frame({"op": "config", "config": {"version": "v1"}}) + frame({"op": "stats"})
    got = []
    for i in range(len(data)):  # byte by byte: frames come out whole, in order
        got += reader.feed(data[i:i + 1])
    assert got == [{"op": "config", "config": {"version": "v1"}}, {"op": "stats"}]
    with pytest.raises(FrameError, match="over the"):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="undecodable"):
        FrameReader().feed(b"\x00\x00\x00\x02\xc1\xc1")
    with pytest.raises(FrameError, match="map with an 'op'"):
        FrameReader().feed(b"\x00\x00\x00\x01\x01")


def tcp_config(version: str, port: int, backend: int, cluster: str | None = None) -> dict[str, Any]:
    """A proxy config (pilot's schema) with one TCP service on `port` backed by `backend`."""
    name = f"outbound|{port}||echo.default.svc.cluster.local"
    return {
        "version": version,
        "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "inbound": [], "outbound": [
            {"name": f"echo.default.svc.cluster.local_{port}", "service": "echo.default.svc.cluster.local",
             "addresses": [], "port": port, "protocol": "TCP",
             "tcp_routes": [{"match": {}, "clusters": [{"name": cluster or name, "weight": 100}]}]}]},
        "routes": {},
        "clusters": {name: {"name": name, "direction": "outbound", "type": "EDS", "service":
                            "echo.default.svc.cluster.local", "port": port, "lb": {"simple": "ROUND_ROBIN"}}},
        "endpoints": {name: [{"address": "127.0.0.1", "port": backend, "weight": 1, "locality": "",
                              "healthy": True, "labels": {}, "service_account": "", "tls_mode": "disabled"}]},
        "security": {"mtls": {"mode": "PERMISSIVE", "ports": {}}, "authorization": []},
    }


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def try_get(url: str) -> tuple[int, str] | None:
    """http_get, or None while nothing answers there yet."""
    try:
        return http_get(url)
    except OSError:
        return None


class Proxy:
    def __init__(self, tmp: Path, config: dict[str, Any], *extra: str, workers: int = 2) -> None:
        self.path = tmp / "proxy.json"
        self.path.write_text(json.dumps(config))
        self.admin, self.stats = free_port(), free_port()
        self.log = (tmp / "proxy.log").open("wb")
        self.proc = subprocess.Popen(
            [*MESHCTL, "proxy", "--id", "echo-client-1", "--namespace", "default",
             "--labels", "app=client,version=v1",
             "--config", str(self.path), "--mode", "explicit", "--workers", str(workers),
             "--admin-port", str(self.admin), "--stats-port", str(self.stats), "--no-access-log", *extra],
            stderr=self.log)

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{port or self.admin}{path}")

    def ready(self) -> bool:
        try:
            return self.get("/ready")[0] == 200
        except OSError:
            return False

    def reload(self, config: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(config))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.log.close()


@pytest.fixture
def echo() -> Iterator[Backend]:
    """A TCP echo backend on loopback."""
    e = Backend(echo_back)
    yield e
    e.close()


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_standalone_proxy_forwards_reports_and_keeps_the_last_good_config(tmp_path, echo) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, tcp_config("v1", port, echo.port))
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        for i in range(20):  # spread over both workers by the kernel (SO_REUSEPORT)
            assert roundtrip(port, b"ping %d" % i) == b"ping %d" % i

        # metrics: Istio's TCP series, merged over the workers
        status, text = proxy.get("/metrics", proxy.stats)
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        opened = [s for s in families["istio_tcp_connections_opened"].samples
                  if s.labels["destination_service"] == "echo.default.svc.cluster.local"]
        assert sum(s.value for s in opened) == 20
        assert opened[0].labels["reporter"] == "source" and opened[0].labels["source_workload"] == "client"
        status, text = proxy.get("/stats")
        assert status == 200

        # a config naming a cluster that does not exist: rejected with the reason, v1 stays in force
        proxy.reload(tcp_config("v2", port, echo.port, cluster="outbound|1||missing"))
        assert wait_for(lambda: json.loads(proxy.get("/config_dump")[1])["last_rejected"], timeout=10)
        dump = json.loads(proxy.get("/config_dump")[1])
        assert dump["version"] == "v1"
        assert dump["last_rejected"]["version"] == "v2"
        assert "unknown cluster 'outbound|1||missing'" in dump["last_rejected"]["error"]
        assert roundtrip(port, b"still") == b"still"

        # a good one is applied by every worker, without dropping connections in flight
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(b"before")
            assert held.recv(100) == b"before"
            proxy.reload(tcp_config("v3", port, echo.port))
            assert wait_for(lambda: json.loads(proxy.get("/config_dump")[1])["version"] == "v3", timeout=10)
            held.sendall(b"after")
            assert held.recv(100) == b"after"
        clusters = json.loads(proxy.get("/clusters")[1])
        name = f"outbound|{port}||echo.default.svc.cluster.local"
        assert len(clusters) == 2 and all(name in c for c in clusters)

        # drain: no longer ready, no longer accepting
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{proxy.admin}/drain", method="POST"), timeout=5) as r:
            assert r.status == 200
        assert proxy.get("/ready") == (503, "DRAINING\n")
        with pytest.raises(OSError):
            roundtrip(port, b"x")
    finally:
        assert proxy.stop() == 0


def test_a_garbage_config_file_is_reported_and_changes_nothing(tmp_path, echo) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, tcp_config("v1", port, echo.port), workers=1)
    try:
        assert wait_for(proxy.ready, timeout=15)
        proxy.path.write_text("{not json")
        proxy.proc.send_signal(signal.SIGHUP)
        log = tmp_path / "proxy.log"
        assert wait_for(lambda: b"cannot read config file" in log.read_bytes(), timeout=5)
        assert json.loads(proxy.get("/config_dump")[1])["version"] == "v1"
        assert roundtrip(port, b"ok") == b"ok"
    finally:
        proxy.stop()


def test_transparent_listeners_open_only_once_a_config_is_in_force(tmp_path, echo) -> None:
    """A proxy started beside a running one (a hand-over, SO_REUSEPORT) must not take connections
    before it knows where they go."""
    outbound, inbound = free_port(), free_port()
    config = tcp_config("v1", free_port(), echo.port)
    config["listeners"]["outbound_traffic_policy"] = "REGISTRY_ONLY"  # nothing loops back to us
    proxy = Proxy(tmp_path, {"version": "v0"}, "--mode", "transparent", "--outbound-port", str(outbound),
                  "--inbound-port", str(inbound), workers=1)
    try:
        log = tmp_path / "proxy.log"
        assert wait_for(lambda: b"config rejected" in log.read_bytes(), timeout=15)
        for port in (outbound, inbound):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        proxy.reload(config)
        assert wait_for(proxy.ready, timeout=15)
        for port in (outbound, inbound):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proxy.stop()


def _pipes(pid: int) -> int:
    """How many pipe ends a process holds (splice mode keeps its pipes pooled once used)."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:"))


def _bulk_roundtrip(port: int, payload: bytes) -> bytes:
    """Send `payload` from a thread while reading the echo, so neither side's buffers can stall."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
        sender.join(10)
        return b"".join(chunks)


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "no-splice"])
def test_no_splice_carries_bulk_l4_through_userspace(tmp_path, echo, splice: bool) -> None:
    """`--no-splice` (the copy row of benchmarks/proxy_l4.py): bulk bytes arrive intact and the
    worker never takes a splice pipe; by default the same transfer is spliced."""
    import psutil

    port = free_port()
    flag = "--splice" if splice else "--no-splice"
    proxy = Proxy(tmp_path, tcp_config("v1", port, echo.port), flag, workers=1)
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        worker = psutil.Process(proxy.proc.pid).children()[0].pid
        before = _pipes(worker)
        payload = os.urandom(4 << 20)
        assert _bulk_roundtrip(port, payload) == payload
        assert (_pipes(worker) > before) == splice
    finally:
        assert proxy.stop() == 0


def test_a_dead_worker_stops_the_proxy_for_its_agent_to_restart(tmp_path, echo) -> None:
    import psutil

    proxy = Proxy(tmp_path, tcp_config("v1", free_port(), echo.port), workers=2)
    try:
        assert wait_for(proxy.ready, timeout=15)
        worker = psutil.Process(proxy.proc.pid).children()[0]
        os.kill(worker.pid, signal.SIGKILL)
        assert proxy.proc.wait(10) is not None
        assert b"a worker died" in (tmp_path / "proxy.log").read_bytes()
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()


def test_the_proxy_follows_pilot_acks_and_shows_in_proxy_status(tmp_path, keydir, echo) -> None:
    """galley + pilot processes, one real proxy registering itself: its config arrives over the
    bus, every worker applies it, pilot sees the ACK."""
    base = 17000 + os.getpid() % 50 * 60  # below the ephemeral range: no client port can hold it
    config = tmp_path / "config"
    config.mkdir()
    (config / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n"
        f"spec:\n  selector: {{app: echo}}\n  ports: [{{name: tcp-echo, port: {free_port()}}}]\n")
    env = {**os.environ, "ZMESH_PORT_BASE": str(base)}
    logs = [(tmp_path / f"{n}.log").open("wb") for n in ("galley", "pilot")]
    procs = [subprocess.Popen([*MESHCTL, "galley", "--keys", str(keydir), "--config-dir", str(config)],
                              env=env, stderr=logs[0]),
             subprocess.Popen([*MESHCTL, "pilot", "--keys", str(keydir)], env=env, stderr=logs[1])]
    admin = free_port()
    proxy = subprocess.Popen(
        [*MESHCTL, "proxy", "--id", "client-1", "--labels", "app=client", "--ip", "10.9.0.1", "--keys",
         str(keydir), "--name", "proxy-a", "--register", "--mode", "explicit", "--workers", "2",
         "--admin-port", str(admin), "--stats-port", str(free_port()), "--no-access-log"],
        env=env, stderr=(tmp_path / "proxy.log").open("wb"))
    try:
        assert wait_for(lambda: _ready(admin), timeout=30), (tmp_path / "proxy.log").read_text()
        version = json.loads(http_get(f"http://127.0.0.1:{admin}/config_dump")[1])["version"]

        def status() -> dict[str, Any]:
            cmd = [*MESHCTL, "proxy-status", "--keys", str(keydir), "--as", "proxy-b", "-o", "json"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)
            return {r["proxy"]: r for r in json.loads(out.stdout or "[]")}
        assert wait_for(lambda: status().get("client-1", {}).get("state") == "SYNCED", timeout=20)
        assert status()["client-1"]["acked"] == version
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(10)
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        for f in logs:
            f.close()


def _ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200
    except OSError:
        return False


def test_standalone_proxy_routes_http_from_pilots_translation(tmp_path) -> None:
    """An HTTP service translated by pilot (a VirtualService splitting by header), carried by
    the real sidecar process in explicit mode, to two tiny backends."""
    from controlplane.pilot.model import Endpoint, Port, Protocol
    from controlplane.pilot.model import Proxy as PilotProxy
    from controlplane.pilot.networking import PushContext, build_proxy_config
    from tests.pilot.test_translation import resources, service, vs

    backends = contextlib.ExitStack()
    backend_ports = [backends.enter_context(text_server(name)) for name in ("v1", "v2")]
    port = free_port()
    web = service("web", ports=[Port("http", port, Protocol.HTTP)], addresses=["10.96.0.9"])
    endpoints = []
    for backend_port, ver in zip(backend_ports, ("v1", "v2"), strict=True):
        labels = {"app": "web", "version": ver}
        endpoints.append(Endpoint(web.hostname, "127.0.0.1", backend_port, port, labels))
    res = resources(vs("web", """  hosts: [web]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]
"""), """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
""")
    client = PilotProxy("client-1", "default", "10.0.0.1", {"app": "client"})
    config = build_proxy_config(PushContext([web], endpoints, res), client)
    proxy = Proxy(tmp_path, config, workers=1)
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()

        def get(headers: dict[str, str]) -> str:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"host": "web", **headers})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.read().decode()
        assert get({}) == "v1"
        assert get({"end-user": "jason"}) == "v2"
        text = proxy.get("/metrics", proxy.stats)[1]
        requests = [s for f in text_string_to_metric_families(text) if f.name == "istio_requests"
                    for s in f.samples if s.name == "istio_requests_total"]
        assert sum(s.value for s in requests) == 2
        assert {s.labels["response_code"] for s in requests} == {"200"}
    finally:
        proxy.stop()
        backends.close()
