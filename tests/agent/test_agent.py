"""The agent as a process: it runs a real `meshctl proxy`, reports readiness, merges metrics,
restarts a killed proxy and drains it on SIGTERM. Real processes and sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshctl.cli import cli
from tests.conftest import MESHCTL, ROOT, free_port, wait_for
from tests.proxy.backends import Backend, text_server
from tests.proxy.backends import echo as echo_back
from tests.proxy.test_sidecar import http_get, roundtrip, tcp_config


def meshctl(name: str) -> list[str]:
    """`meshctl <name>`, or the command itself while it is not registered in meshctl yet."""
    if name in cli.commands:
        return [*MESHCTL, name]
    return [sys.executable, "-c", f"from dataplane.agent.cli import {name}_command as c; c()"]


APP_METRICS = "# HELP app_orders_total Orders\n# TYPE app_orders_total counter\napp_orders_total 7\n"


@contextlib.contextmanager
def app_metrics(text: str) -> Iterator[str]:
    """An app serving `text` as its Prometheus metrics; yields their URL."""
    with text_server(text) as port:
        yield f"http://127.0.0.1:{port}/metrics"


@pytest.fixture
def echo() -> Iterator[Backend]:
    e = Backend(echo_back)
    yield e
    e.close()


@pytest.fixture
def app() -> Iterator[str]:
    with app_metrics(APP_METRICS) as url:
        yield url


def status(url: str) -> int | None:
    try:
        return http_get(url)[0]
    except OSError:
        return None


def proxy_pid(agent: subprocess.Popen[bytes]) -> int | None:
    try:
        children = psutil.Process(agent.pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if children else None


def test_the_agent_runs_restarts_and_drains_the_proxy(tmp_path: Path, echo: Backend, app: str) -> None:
    health, metrics, admin, stats, port = (free_port() for _ in range(5))
    config = tmp_path / "proxy.json"
    config.write_text("{not json")  # not ready until the test writes a good one: 503 first, surely
    log_path = tmp_path / "agent.log"
    log = log_path.open("wb")
    agent = subprocess.Popen(
        [*meshctl("agent"), "--health-port", str(health), "--metrics-port", str(metrics),
         "--proxy-admin-port", str(admin), "--proxy-stats-port", str(stats), "--app-metrics", app,
         "--proxy-uid", str(os.getuid()), "--proxy-gid", str(os.getgid()),
         "--termination-drain-duration", "1", "--restart-initial", "0.2",
         "--", "--id", "echo-client-1", "--labels", "app=client,version=v1", "--config", str(config),
         "--mode", "explicit", "--workers", "1", "--no-access-log"], stderr=log)
    ready_url = f"http://127.0.0.1:{health}/healthz/ready"
    seen: set[int] = set()
    try:
        # the proxy runs but has no config: not ready
        assert wait_for(lambda: b"cannot read config file" in log_path.read_bytes(), timeout=15), \
            log_path.read_text()
        assert status(ready_url) == 503
        first = proxy_pid(agent)
        assert first is not None
        seen.add(first)
        config.write_text(json.dumps(tcp_config("v1", port, echo.port)))
        os.kill(first, signal.SIGHUP)
        assert wait_for(lambda: status(ready_url) == 200, timeout=10), log_path.read_text()
        done = subprocess.run([*meshctl("wait"), "--health-url", ready_url, "--timeout", "10"],
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr

        # one scrape target: agent, proxy and app metrics, each family once
        assert roundtrip(port, b"ping") == b"ping"
        code, text = http_get(f"http://127.0.0.1:{metrics}/stats/prometheus")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert sum(s.value for s in families["istio_tcp_connections_opened"].samples) == 1
        assert families["zmesh_agent_proxy_up"].samples[0].value == 1
        assert wait_for(lambda: _sample(metrics, "zmesh_agent_proxy_rss_bytes") > 0, timeout=5)
        assert families["app_orders"].samples[0].value == 7

        # the proxy supervisor dies: the agent says why and brings it back
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: b"signal SIGKILL" in log_path.read_bytes(), timeout=10)
        assert wait_for(lambda: proxy_pid(agent) not in (None, first), timeout=10)
        seen.add(proxy_pid(agent) or first)
        assert wait_for(lambda: status(ready_url) == 200, timeout=15), log_path.read_text()
        line = next(x for x in log_path.read_text().splitlines() if "signal SIGKILL" in x)
        assert "proxy exited; restarting" in line and "restart_in=0.2s" in line
        assert _sample(metrics, "zmesh_agent_proxy_restarts_total") == 1
        assert roundtrip(port, b"again") == b"again"

        # SIGTERM: the proxy drains (no longer ready) before it is stopped, and the agent exits 0
        agent.send_signal(signal.SIGTERM)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready") == (503, "DRAINING\n"),
                        timeout=5)
        assert agent.poll() is None  # still draining
        assert agent.wait(15) == 0
        assert "draining the proxy" in log_path.read_text()
        assert not any(psutil.pid_exists(p) for p in seen)
    finally:
        _cleanup(agent)
        log.close()


def _sample(port: int, name: str) -> float:
    text = http_get(f"http://127.0.0.1:{port}/stats/prometheus")[1]
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == name), 0.0)


def _cleanup(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is not None:
        return
    try:
        tree = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    agent.kill()
    agent.wait(5)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=5)


def test_wait_gives_up_after_its_timeout_with_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz/ready"
    started = time.monotonic()
    done = subprocess.run([*meshctl("wait"), "--health-url", url, "--timeout", "1", "--interval", "0.2"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert "not ready after 1s" in done.stderr and url in done.stderr
    assert time.monotonic() - started < 10


def test_a_proxy_that_cannot_be_started_ends_the_agent_with_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataplane.agent.agent import Agent, AgentOptions

    agent = Agent(AgentOptions(proxy_args=["--id", "x"], health_host="127.0.0.1", health_port=free_port(),
                               metrics_host="127.0.0.1", metrics_port=free_port()))
    monkeypatch.setattr(agent.proxy, "command", [str(ROOT / "no-such-proxy")])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert agent.run() == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
