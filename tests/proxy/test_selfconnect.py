"""Issue 12 item 2, "one request kills a sidecar", against the real `meshctl proxy` process on loopback:
a request the proxy would pass through to itself gets Istio's BlackHoleCluster answer instead of a
connect loop, and a worker's downstream connections are bounded. (The transparent-mode variant, in
a network namespace, is test_selfconnect_netns.py.)"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.pilot.model import Endpoint, Port, Protocol
from controlplane.pilot.model import Proxy as PilotProxy
from controlplane.pilot.networking import PushContext, build_proxy_config
from dataplane.proxy.blackhole import HTTP_BODY
from tests.conftest import free_port, unavailable, wait_for
from tests.pilot.test_translation import service
from tests.proxy.backends import Backend as TcpBackend
from tests.proxy.backends import echo as echo_back
from tests.proxy.l7helpers import Backend, Client
from tests.proxy.test_sidecar import Proxy, roundtrip, tcp_config

BLACKHOLED = "blackholed a connection to this proxy's own listener"
LIMIT = 20


def web_config(port: int, backend: int) -> dict[str, Any]:
    """Pilot's config for a client of one HTTP service "web" on `port`: with ALLOW_ANY, any other
    Host goes to the PassthroughCluster (the `allow_any` virtual host), whose original destination
    in explicit mode is the listener itself."""
    web = service("web", ports=[Port("http", port, Protocol.HTTP)], addresses=["10.96.0.9"])
    endpoints = [Endpoint(web.hostname, "127.0.0.1", backend, port, {"app": "web"})]
    client = PilotProxy("client-1", "default", "10.0.0.1", {"app": "client"})
    return build_proxy_config(PushContext([web], endpoints, []), client)


def counter(proxy: Proxy, name: str, **labels: str) -> float:
    """The sum of counter `name`'s samples (over the workers) whose labels include `labels`."""
    text = proxy.get("/metrics", proxy.stats)[1]
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name in (name, name + "_total") and labels.items() <= s.labels.items())


def worker(proxy: Proxy) -> psutil.Process:
    (child,) = psutil.Process(proxy.proc.pid).children()
    return child


def closed_at_once(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` without a byte (EOF or reset) within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def log_lines(tmp: Path, text: str) -> list[str]:
    return [line for line in (tmp / "proxy.log").read_text().splitlines() if text in line]


@pytest.fixture
def web() -> Iterator[Backend]:
    backend = Backend(name=b"web")
    yield backend
    backend.close()


@pytest.fixture(params=["127.0.0.1", "::1"])
def listen_host(request: pytest.FixtureRequest) -> str:
    host: str = request.param
    if host == "::1":
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:
            unavailable(f"no IPv6 loopback here: {exc}")
    return host


def test_a_request_for_an_unknown_host_is_blackholed_not_sent_back_into_the_proxy(
        tmp_path: Path, web: Backend, listen_host: str) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, web_config(port, web.port), "--explicit-host", listen_host, workers=1)
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        assert Client(port, host=listen_host).request(host="web").body == b"web"
        fds = worker(proxy).num_fds()

        rounds = 3
        for _ in range(rounds):
            keep = Client(port, host=listen_host)
            got = keep.request(host="unknown.example")
            assert (got.status, got.body) == (502, HTTP_BODY)
            assert keep.request(host="web").body == b"web"  # the same connection carries on
            keep.close()
            hostless = Client(port, host=listen_host)
            hostless.send(b"GET / HTTP/1.0\r\n\r\n")  # no Host: the listener's own address stands for it
            got = hostless.response()
            assert (got.status, got.body) == (502, HTTP_BODY)
            assert hostless.closed()  # HTTP/1.0 without keep-alive
            hostless.close()
        assert wait_for(lambda: worker(proxy).num_fds() <= fds), (fds, worker(proxy).num_fds())
        assert Client(port, host=listen_host).request(host="web").body == b"web"

        blackholed = 2 * rounds
        assert counter(proxy, "envoy_cluster_upstream_cx_none_healthy", cluster_name="BlackHoleCluster") \
            == blackholed
        assert counter(proxy, "istio_requests_total", destination_service="BlackHoleCluster",
                      response_code="502", response_flags="UH") == blackholed
        lines = log_lines(tmp_path, BLACKHOLED)
        assert 1 <= len(lines) < blackholed, lines  # one per burst, not one per connection
        destination = f"{listen_host}:{port}"
        assert f"destination={destination}" in lines[0] and "protocol=http" in lines[0]
    finally:
        proxy.stop()


def test_past_the_connection_bound_new_connections_are_closed_counted_and_service_resumes(
        tmp_path: Path) -> None:
    echo = TcpBackend(echo_back)
    port = free_port()
    proxy = Proxy(tmp_path, tcp_config("v1", port, echo.port), "--max-connections", str(LIMIT), workers=1)
    held: list[socket.socket] = []
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        for i in range(LIMIT):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(conn)
            conn.sendall(b"%d" % i)
            assert conn.recv(16) == b"%d" % i  # carried: the proxy holds it
        over = 5
        for _ in range(over):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                assert closed_at_once(extra)
        assert counter(proxy, "envoy_listener_downstream_global_cx_overflow",
                      listener_address=f"127.0.0.1_{port}") == over
        full = log_lines(tmp_path, "downstream connection limit reached")
        assert 1 <= len(full) < over, full  # rate-limited
        assert f"limit={LIMIT}" in full[0]
        assert held[0].sendall(b"still") is None and held[0].recv(16) == b"still"  # held ones carry on

        for conn in held:
            conn.close()
        held.clear()

        def served() -> bool:
            try:
                return roundtrip(port, b"again") == b"again"
            except OSError:
                return False
        assert wait_for(served), "the worker did not accept again after its connections closed"
        assert log_lines(tmp_path, "accepting again")
        assert counter(proxy, "envoy_listener_downstream_global_cx_overflow") >= over
    finally:
        for conn in held:
            conn.close()
        proxy.stop()
        echo.close()


def test_a_bad_connection_bound_is_refused_by_the_cli(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, tcp_config("v1", free_port(), free_port()), "--max-connections", "-1")
    assert proxy.proc.wait(30) == 2
    proxy.log.close()
    assert re.search(r"--max-connections.*-1", (tmp_path / "proxy.log").read_text())
