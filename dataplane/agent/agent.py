"""The agent process: run the proxy as a child, restart it, answer health, merge metrics, drain.

Ports follow Istio's pilot-agent: 15021 `/healthz/ready` (the kubelet's readiness probe and
`meshctl wait`) and 15020 `/stats/prometheus` (one scrape target for agent, proxy and app).
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from bus.logs import Log
from dataplane.agent.backoff import Backoff, describe_exit
from dataplane.agent.merge import merge_expositions

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
POLL_EVERY = 0.2  # seconds between checks that the proxy still runs
SAMPLE_EVERY = 1.0  # seconds between psutil samples of the proxy's RSS and CPU

# A readiness check beyond the proxy's own: None when satisfied, else why not. Certificates go
# here once the proxy does mTLS (ready only when the workload certificate is on disk).
ReadyCheck = Callable[[], str | None]


@dataclass
class AgentOptions:
    proxy_args: Sequence[str]
    proxy_admin_port: int = 15000
    proxy_stats_port: int = 15090
    health_host: str = "0.0.0.0"
    health_port: int = 15021
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 15020
    app_metrics: str | None = None
    proxy_uid: int | None = None
    proxy_gid: int | None = None
    drain_duration: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    ready_checks: list[ReadyCheck] = field(default_factory=list)


def fetch(url: str, timeout: float, method: str = "GET") -> tuple[int, str]:
    """(status, body) of a small HTTP request; OSError when nothing (sensible) answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (http.client.HTTPException, ValueError) as exc:  # garbage answers, a URL that is not one
        raise OSError(f"{type(exc).__name__}: {exc}") from exc


class _Metrics:
    """The agent's own series, in a registry of its own (the merge adds the proxy's and app's)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter("zmesh_agent_proxy_restarts_total", "Times the agent restarted the proxy",
                                registry=self.registry)
        self.up = Gauge("zmesh_agent_proxy_up", "1 while the proxy process runs", registry=self.registry)
        self.rss = Gauge("zmesh_agent_proxy_rss_bytes", "Resident memory of the proxy and its workers",
                         registry=self.registry)
        self.cpu = Gauge("zmesh_agent_proxy_cpu_seconds", "CPU time (user+system) of the running proxy "
                         "and its workers", registry=self.registry)


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.log = Log("agent")
        self.metrics = _Metrics()
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self._user = self._proxy_user()

    # -- the proxy child ---------------------------------------------------------------------

    def _proxy_user(self) -> dict[str, int]:
        """Popen's user/group for the proxy: Istio runs Envoy as 1337 so iptables can exempt it."""
        out = {}
        if self.opts.proxy_uid is not None:
            try:
                pwd.getpwuid(self.opts.proxy_uid)
                out["user"] = self.opts.proxy_uid
            except KeyError:
                self.log.warning("no such user: the proxy runs as the agent's user", uid=self.opts.proxy_uid)
        if self.opts.proxy_gid is not None:
            try:
                grp.getgrgid(self.opts.proxy_gid)
                out["group"] = self.opts.proxy_gid
            except KeyError:
                self.log.warning("no such group: the proxy runs in the agent's group",
                                 gid=self.opts.proxy_gid)
        return out

    def _command(self) -> list[str]:
        # ours come last: click keeps the last value, so the ports we probe are the ports it opens
        return [sys.executable, "-m", "controlplane.meshctl", "proxy", *self.opts.proxy_args,
                "--admin-port", str(self.opts.proxy_admin_port),
                "--stats-port", str(self.opts.proxy_stats_port)]

    def _start(self) -> bool:
        """Start the proxy; False (logged) when it cannot be (no such program, not allowed to setuid)."""
        try:
            # its own process group: workers orphaned by a killed supervisor can be swept up
            self.proc = subprocess.Popen(self._command(), process_group=0, **self._user)
        except OSError as exc:
            self.log.error("cannot start the proxy", error=str(exc), **self._user)
            return False
        self._started = time.monotonic()
        self.metrics.up.set(1)
        self.log.info("proxy started", pid=self.proc.pid, **self._user)
        return True

    def _sweep(self) -> None:
        """Kill what is left of the proxy's process group (workers of a supervisor that was killed)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _sample(self) -> None:
        assert self.proc is not None
        try:
            parent = psutil.Process(self.proc.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return
        rss = cpu = 0.0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    cpu += times.user + times.system
            except psutil.Error:
                continue  # a worker that just exited
        self.metrics.rss.set(rss)
        self.metrics.cpu.set(cpu)

    # -- health and metrics ------------------------------------------------------------------

    def ready(self) -> str | None:
        """None when the proxy can take traffic, else why not (the 503 body)."""
        try:
            status, body = fetch(f"http://127.0.0.1:{self.opts.proxy_admin_port}/ready", timeout=1.0)
        except OSError as exc:
            return f"proxy admin unreachable: {exc}"
        if status != 200:
            return f"proxy not ready: {status} {body.strip()}"
        for check in self.opts.ready_checks:
            if (reason := check()) is not None:
                return reason
        return None

    def scrape(self) -> str:
        """Agent, proxy and (if configured) app metrics as one exposition; a source down is skipped."""
        texts = [generate_latest(self.metrics.registry).decode()]
        sources = [f"http://127.0.0.1:{self.opts.proxy_stats_port}/stats/prometheus"]
        if self.opts.app_metrics:
            sources.append(self.opts.app_metrics)
        for url in sources:
            try:
                status, body = fetch(url, timeout=2.0)
            except OSError as exc:
                self.log.debug("metrics source unreachable", url=url, error=str(exc))
                continue
            if status == 200:
                texts.append(body)
        return merge_expositions(texts)

    def _serve(self, host: str, port: int, routes: dict[str, Callable[[], tuple[int, str, str]]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            server_version = "zmesh-agent"

            def log_message(self, *_args: Any) -> None:  # probes every few seconds: not worth a line
                pass

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, ctype, body = route() if route else (404, "text/plain", "not found\n")
                data = body.encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
        self._servers.append(server)

    def _health(self) -> tuple[int, str, str]:
        reason = self.ready()
        return (200, "text/plain", "ready\n") if reason is None else (503, "text/plain", reason + "\n")

    def _prometheus(self) -> tuple[int, str, str]:
        return 200, PROMETHEUS, self.scrape()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Keep the proxy running until SIGTERM/SIGINT, then drain it and stop; returns the exit code
        (1 when the proxy could not be started at all)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self._serve(self.opts.health_host, self.opts.health_port, {"/healthz/ready": self._health})
        self._serve(self.opts.metrics_host, self.opts.metrics_port,
                    {"/stats/prometheus": self._prometheus, "/metrics": self._prometheus})
        self.log.info("agent started", health=f"{self.opts.health_host}:{self.opts.health_port}",
                      metrics=f"{self.opts.metrics_host}:{self.opts.metrics_port}")
        status = 0 if self._start() else 1
        sampled = 0.0
        while not status and not self._stop.is_set():
            assert self.proc is not None
            code = self.proc.poll()
            if code is None:
                if time.monotonic() - sampled >= SAMPLE_EVERY:
                    self._sample()
                    sampled = time.monotonic()
                self._stop.wait(POLL_EVERY)
                continue
            uptime = time.monotonic() - self._started
            self._sweep()
            self.metrics.up.set(0)
            delay = self.opts.backoff.next_delay(uptime)
            self.log.warning("proxy exited; restarting", pid=self.proc.pid, reason=describe_exit(code),
                             uptime=f"{uptime:.1f}s", restart_in=f"{delay:g}s")
            if self._stop.wait(delay):
                break
            self.metrics.restarts.inc()
            status = 0 if self._start() else 1
        self._drain()
        for server in self._servers:
            server.shutdown()
        self.log.info("agent stopped", status=status)
        return status

    def _drain(self) -> None:
        """Stop the proxy accepting, give in-flight work the drain duration, then stop it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self._sweep()
            return
        try:
            fetch(f"http://127.0.0.1:{self.opts.proxy_admin_port}/drain", timeout=2.0, method="POST")
            self.log.info("draining the proxy", duration=f"{self.opts.drain_duration:g}s")
        except OSError as exc:
            self.log.warning("cannot drain the proxy", error=str(exc))
        deadline = time.monotonic() + self.opts.drain_duration
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.log.warning("proxy ignored SIGTERM; killing it", pid=proc.pid)
        self._sweep()
        proc.wait()
        self.log.info("proxy stopped", reason=describe_exit(proc.returncode))
