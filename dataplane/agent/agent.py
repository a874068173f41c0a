"""The agent process: run the proxy (and the NFQUEUE decider) as children, restart them, answer
health, merge metrics, hand the proxy over on SIGHUP, drain on SIGTERM.

Ports follow Istio's pilot-agent: 15021 `/healthz/ready` (the kubelet's readiness probe and
`meshctl wait`) and 15020 `/stats/prometheus` (one scrape target for agent, proxy, decider, app).

Hand-over (SIGHUP, a rolling restart of the proxy without losing a connection): a new proxy
starts beside the old one. Its traffic listeners share the ports with SO_REUSEPORT (same uid),
its admin and stats servers cannot (a request to a shared admin port would reach either proxy),
so it gets the other of two admin/stats port pairs. Once it is ready the old one is drained
(its listeners close; `net.ipv4.tcp_migrate_req` moves connections still queued on them to the
new proxy's sockets instead of resetting them) and stopped. The agent follows the proxy in
charge: readiness, merged metrics and the decider's feed use its ports.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from bus.backoff import Backoff
from bus.logs import Log
from dataplane.agent.certs import cert_problem
from dataplane.agent.child import Child
from dataplane.agent.merge import merge_expositions
from meshapi import ports

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
POLL_EVERY = 0.2  # seconds between checks that the children still run
SAMPLE_EVERY = 1.0  # seconds between psutil samples of the proxy's RSS and CPU
FEED_EVERY = 0.5  # seconds between asks for the proxy's config (a 304 while it is unchanged)
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")

# A readiness check beyond the proxy's own: None when satisfied, else why not.
ReadyCheck = Callable[[], str | None]


@dataclass
class AgentOptions:
    proxy_args: Sequence[str]
    proxy_admin_port: int = ports.PROXY_ADMIN
    proxy_stats_port: int = ports.PROXY_METRICS
    handover_admin_port: int = ports.HANDOVER_ADMIN  # the other pair: a hand-over alternates between the two
    handover_stats_port: int = ports.HANDOVER_METRICS
    handover_timeout: float = 30.0
    health_host: str = "0.0.0.0"
    health_port: int = ports.HEALTH
    metrics_host: str = "0.0.0.0"
    metrics_port: int = ports.AGENT_METRICS
    app_metrics: str | None = None
    proxy_uid: int | None = None
    proxy_gid: int | None = None
    drain_duration: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    ready_checks: list[ReadyCheck] = field(default_factory=list)
    certs: Path | None = None
    decider_queue: int | None = None
    decider_metrics_port: int = ports.DECIDER_METRICS
    decider_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.2, cap=5.0))


def fetch(url: str, timeout: float, method: str = "GET",
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a small HTTP request; OSError when nothing (sensible) answers."""
    try:
        request = urllib.request.Request(url, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (http.client.HTTPException, ValueError) as exc:  # garbage answers, a URL that is not one
        raise OSError(f"{type(exc).__name__}: {exc}") from exc


def proxy_takes_certs() -> bool:
    """Whether `meshctl proxy --help` shows --certs (the proxy reads the workload certificates)."""
    from dataplane.proxy.cli import proxy_command

    return any("--certs" in param.opts for param in proxy_command.params)


class _Metrics:
    """The agent's own series, in a registry of its own (the merge adds the others')."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter("zmesh_agent_proxy_restarts_total", "Times the agent restarted the proxy",
                                registry=self.registry)
        self.up = Gauge("zmesh_agent_proxy_up", "1 while the proxy process runs", registry=self.registry)
        self.rss = Gauge("zmesh_agent_proxy_rss_bytes", "Resident memory of the proxy and its workers",
                         registry=self.registry)
        self.cpu = Gauge("zmesh_agent_proxy_cpu_seconds", "CPU time (user+system) of the running proxy "
                         "and its workers", registry=self.registry)
        self.handovers = Counter("zmesh_agent_proxy_handovers_total", "Proxy hand-overs, by result",
                                 ["result"], registry=self.registry)
        self.decider_restarts = Counter("zmesh_agent_decider_restarts_total",
                                        "Times the agent restarted the NFQUEUE decider",
                                        registry=self.registry)
        self.decider_up = Gauge("zmesh_agent_decider_up", "1 while the NFQUEUE decider runs",
                                registry=self.registry)


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.log = Log("agent")
        self.metrics = _Metrics()
        self._stop = threading.Event()
        self._handover_asked = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self._drains: list[threading.Thread] = []
        self._user = self._proxy_user()
        self._certs_arg = opts.certs is not None and proxy_takes_certs()
        self.ports = (opts.proxy_admin_port, opts.proxy_stats_port)  # the proxy in charge's
        self.proxy = self._proxy_child(self.ports)
        self.decider: Child | None = None
        self._feed_dir: Path | None = None
        self.fed_version = ""
        if opts.decider_queue is not None:
            self._feed_dir = Path(tempfile.mkdtemp(prefix="zmesh-agent-"))
            self.decider = Child("decider", self._decider_command(), opts.decider_backoff, self.log)

    # -- children ----------------------------------------------------------------------------

    def _proxy_user(self) -> dict[str, int]:
        """Popen's user/group for the proxy: Istio runs Envoy as 1337 so iptables can exempt it. Numeric
        ids need no passwd entry (a container often has none for 1337)."""
        out = {}
        if self.opts.proxy_uid is not None:
            out["user"] = self.opts.proxy_uid
        if self.opts.proxy_gid is not None:
            out["group"] = self.opts.proxy_gid
        return out

    def _command(self, ports: tuple[int, int]) -> list[str]:
        # ours come last: click keeps the last value, so the ports we probe are the ports it opens
        certs = ["--certs", str(self.opts.certs)] if self._certs_arg else []
        return [sys.executable, "-m", "dataplane.proxy", *self.opts.proxy_args, *certs,
                "--admin-port", str(ports[0]), "--stats-port", str(ports[1])]

    def _proxy_child(self, ports: tuple[int, int]) -> Child:
        return Child("proxy", self._command(ports), self.opts.backoff, self.log, self._user)

    def _decider_command(self) -> list[str]:
        assert self._feed_dir is not None
        return [sys.executable, "-m", "dataplane.init", "decider", "--queue", str(self.opts.decider_queue),
                "--config", str(self._feed_dir / "proxy.json"), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(self.opts.decider_metrics_port)]

    def _sample(self) -> None:
        if self.proxy.proc is None:
            return
        try:
            parent = psutil.Process(self.proxy.proc.pid)
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

    def _proxy_ready(self, admin_port: int) -> str | None:
        try:
            status, body = fetch(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
        except OSError as exc:
            return f"proxy admin unreachable: {exc}"
        return None if status == 200 else f"proxy not ready: {status} {body.strip()}"

    def ready(self) -> str | None:
        """None when the sidecar can take traffic, else why not (the 503 body): the proxy has a
        config, the certificates are valid, the decider (if any) runs, and every extra check."""
        if self.opts.certs is not None and (reason := cert_problem(self.opts.certs)) is not None:
            return reason  # first: it says which file is wrong, the proxy only NO CERTIFICATES
        if (reason := self._proxy_ready(self.ports[0])) is not None:
            return reason
        if self.decider is not None and not self.decider.running:
            return "the NFQUEUE decider is not running"
        for check in self.opts.ready_checks:
            if (reason := check()) is not None:
                return reason
        return None

    def scrape(self) -> str:
        """Agent, proxy, decider and (if configured) app metrics as one exposition; a source down is
        skipped."""
        texts = [generate_latest(self.metrics.registry).decode()]
        sources = [f"http://127.0.0.1:{self.ports[1]}/stats/prometheus"]
        if self.decider is not None:
            sources.append(f"http://127.0.0.1:{self.opts.decider_metrics_port}/metrics")
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

    # -- the decider's feed ------------------------------------------------------------------

    def _feed(self) -> None:
        """Hand the decider the config the proxy applied (its /config_dump), each new version once:
        a rename-swapped file the decider watches, and a SIGHUP so it reads it at once."""
        assert self._feed_dir is not None
        while not self._stop.wait(FEED_EVERY):
            etag = {"if-none-match": f'"{self.fed_version}"'} if self.fed_version else {}
            try:
                status, body = fetch(f"http://127.0.0.1:{self.ports[0]}/config_dump", 2.0, headers=etag)
                if status != 200:
                    continue
                dump = json.loads(body)
                version, config = str(dump.get("version") or ""), dump.get("config")
            except (OSError, ValueError, AttributeError) as exc:
                self.log.debug("cannot read the proxy's config", error=str(exc))
                continue
            if not version or not isinstance(config, dict) or version == self.fed_version:
                continue
            tmp = self._feed_dir / "proxy.json.tmp"
            tmp.write_text(json.dumps(config))
            os.replace(tmp, self._feed_dir / "proxy.json")
            self.fed_version = version
            self.log.info("decider config updated", version=version)
            if self.decider is not None and self.decider.running:
                assert self.decider.proc is not None
                self.decider.proc.send_signal(signal.SIGHUP)

    # -- hand-over ---------------------------------------------------------------------------

    def _allow_migration(self) -> None:
        """Ask the kernel to move connections queued on a closing listener to another socket of its
        SO_REUSEPORT group (Linux >= 5.14) instead of resetting them; a sysctl of the pod's network
        namespace."""
        try:
            if MIGRATE_REQ.read_text().strip() != "1":
                MIGRATE_REQ.write_text("1\n")
                self.log.info("enabled net.ipv4.tcp_migrate_req for the hand-over")
        except OSError as exc:
            self.log.warning("cannot enable net.ipv4.tcp_migrate_req: connections queued on the old "
                             "proxy's listeners may be reset", error=str(exc))

    def _handover(self) -> None:
        """Start a new proxy on the other admin/stats ports, wait until it is ready, then drain the
        old one (in the background) and put the new one in charge."""
        primary = (self.opts.proxy_admin_port, self.opts.proxy_stats_port)
        ports = (self.opts.handover_admin_port, self.opts.handover_stats_port) \
            if self.ports == primary else primary
        self._allow_migration()
        new = self._proxy_child(ports)
        self.log.info("hand-over: starting a new proxy", admin=ports[0], stats=ports[1])
        if not new.start():
            self.metrics.handovers.labels("failed").inc()
            return
        deadline = time.monotonic() + self.opts.handover_timeout
        reason = self._proxy_ready(ports[0])
        while reason is not None and new.running and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)
            reason = self._proxy_ready(ports[0])
        if reason is not None:
            self.log.error("hand-over: the new proxy did not get ready; keeping the old one", reason=reason)
            new.stop()
            self.metrics.handovers.labels("failed").inc()
            return
        old, old_admin = self.proxy, self.ports[0]
        self.proxy, self.ports = new, ports
        self.metrics.handovers.labels("done").inc()
        self.log.info("hand-over: new proxy ready; draining the old one", new_pid=new.proc.pid if new.proc
                      else "-", old_pid=old.proc.pid if old.proc else "-")
        thread = threading.Thread(target=self._drain, args=(old, old_admin), name="drain", daemon=True)
        thread.start()
        self._drains.append(thread)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Keep the children running until SIGTERM/SIGINT, then drain the proxy and stop; returns the
        exit code (1 when a child could not be started at all)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._handover_asked.set())
        self._serve(self.opts.health_host, self.opts.health_port, {"/healthz/ready": self._health})
        self._serve(self.opts.metrics_host, self.opts.metrics_port,
                    {"/stats/prometheus": self._prometheus, "/metrics": self._prometheus})
        self.metrics.up.set_function(lambda: float(self.proxy.running))
        self.metrics.decider_up.set_function(lambda: float(self.decider is not None and self.decider.running))
        self.log.info("agent started", health=f"{self.opts.health_host}:{self.opts.health_port}",
                      metrics=f"{self.opts.metrics_host}:{self.opts.metrics_port}",
                      decider_queue=self.opts.decider_queue if self.decider else "-",
                      certs=str(self.opts.certs or "-"))
        # the decider first: without --queue-bypass, a queue nobody reads drops every new connection
        status = 0
        if self.decider is not None:
            status = 0 if self.decider.start() else 1
            threading.Thread(target=self._feed, name="decider-feed", daemon=True).start()
        if not status:
            status = 0 if self.proxy.start() else 1
        sampled = 0.0
        while not status and not self._stop.is_set():
            if self._handover_asked.is_set():
                self._handover_asked.clear()
                self._handover()
            event = self.proxy.tick()
            if event == "restarted":
                self.metrics.restarts.inc()
            if self.decider is not None and (decided := self.decider.tick()) is not None:
                if decided == "restarted":
                    self.metrics.decider_restarts.inc()
                event = event or decided
            if event == "failed":
                status = 1
            elif self.proxy.running and time.monotonic() - sampled >= SAMPLE_EVERY:
                self._sample()
                sampled = time.monotonic()
            self._stop.wait(POLL_EVERY)
        self._stop.set()
        self._drain(self.proxy, self.ports[0])
        for thread in self._drains:
            thread.join(self.opts.drain_duration + 15)
        if self.decider is not None:
            self.decider.stop()  # last: until the proxy is gone, its connections may still be decided
        for server in self._servers:
            server.shutdown()
        if self._feed_dir is not None:
            shutil.rmtree(self._feed_dir, ignore_errors=True)
        self.log.info("agent stopped", status=status)
        return status

    def _drain(self, proxy: Child, admin_port: int) -> None:
        """Stop the proxy accepting, give in-flight work the drain duration, then stop it."""
        proc = proxy.proc
        proxy.restart_at = None
        if proc is None or proc.poll() is not None:
            proxy.sweep()
            return
        try:
            fetch(f"http://127.0.0.1:{admin_port}/drain", timeout=2.0, method="POST")
            self.log.info("draining the proxy", pid=proc.pid, duration=f"{self.opts.drain_duration:g}s")
        except OSError as exc:
            self.log.warning("cannot drain the proxy", error=str(exc))
        deadline = time.monotonic() + self.opts.drain_duration
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proxy.stop()
