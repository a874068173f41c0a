"""The same mesh and demo as mesh.py in explicit mode on loopback: no root, no namespaces, no iptables.

127.0.0.0/8 all reaches `lo` without any setup, so each pod takes three addresses in 127.S.0.0/16:

    127.S.1.N  the pod address, registered with pilot: its sidecar's inbound listener takes :9080 there,
               where peer sidecars send (pilot's endpoints say <pod address>:9080)
    127.S.2.N  its sidecar's outbound listeners (one per service port): the app sends here and names
               the service in the Host header (`bookinfo --upstream-host`)
    127.S.3.N  the app on :9080 (`meshctl proxy --app-host` moves the inbound clusters there)

Ports that the agent and proxy bind on every address (health, merged metrics, admin, stats) get a
block per pod, and the control plane runs on 127.0.0.1 at a port base of its own, both in a range
nothing else on the host listens on. Every process started carries ZMESH_LOOPBACK_RUN=<run id> in
its environment, which its children inherit, so teardown finds what a killed agent's proxy left
and a later run sweeps what a crashed one did (there is no namespace to delete here).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import endpoints, keys
from bus.logs import Log
from meshapi.identity import cert_dir
from meshctl.localmesh import netns
from meshctl.localmesh.mesh import (
    APP_PORT,
    BOOKINFO,
    CONFIG_FILES,
    MARKER,
    NODE,
    PROXY_KEY,
    Mesh,
    MeshError,
    Pod,
)

RUN_ENV = "ZMESH_LOOPBACK_RUN"
PORTS_PER_POD = 10
CP_OFFSET = 100           # the control plane's port base, from the block's start (it needs 60 ports)
BLOCK = 200
EXTERNAL_OFFSET = 90      # "the internet": a server outside the mesh, on an address of its own
# Below Linux's ephemeral range (32768+), where an outgoing connection could take a port between
# the check and the bind, and below the tests' free_port range (the 8192 ports under it).
PORT_RANGE = (10000, 24000)

_log = Log("localmesh.loopback")


@dataclass(frozen=True)
class PodPorts:
    """The ports one pod's agent and proxy bind on every address."""

    metrics: int          # the agent's merged /stats/prometheus (Istio: 15020)
    health: int           # the agent's /healthz/ready (15021)
    admin: int            # the proxy's admin (15000)
    stats: int            # the proxy's metrics (15090)
    handover_admin: int
    handover_stats: int
    decider_metrics: int

    @classmethod
    def at(cls, base: int) -> PodPorts:
        return cls(*range(base, base + 7))


def free_block(size: int = BLOCK, start: int | None = None) -> int:
    """The first port of `size` consecutive ports nobody listens on (checked by binding each)."""
    low, high = PORT_RANGE
    slots = (high - low) // size
    first = (os.getpid() if start is None else start) % slots
    for i in range(slots):
        base = low + ((first + i) % slots) * size
        if all(_bindable(p) for p in range(base, base + size)):
            return base
    raise MeshError(f"no {size} free consecutive ports in {low}-{high}")


def free_subnet(start: int | None = None) -> int:
    """An S in 20..219 whose first pod's addresses nobody listens on at :9080 (another loopback mesh)."""
    first = os.getpid() if start is None else start
    for i in range(200):
        subnet = 20 + (first + i) % 200
        if all(_bindable(APP_PORT, f"127.{subnet}.{role}.1") for role in (1, 2, 3)):
            return subnet
    raise MeshError("no free 127.S.0.0/16 subnet for the pods")


def _bindable(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def marked(run_id: str | None = None) -> list[tuple[int, str]]:
    """(pid, run id) of our processes carrying a loopback run's marker (`run_id`'s, or any run's)."""
    found = []
    needle = f"{RUN_ENV}=".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle):
                value = item[len(needle):].decode(errors="replace")
                if run_id is None or value == run_id:
                    found.append((int(entry), value))
                break
    return found


def sweep(run_id: str) -> list[int]:
    """Kill every process still marked with `run_id` (a proxy or worker whose agent was killed)."""
    pids = [pid for pid, _ in marked(run_id)]
    if pids:
        netns.stop_pids(pids, 1.0)
        _log.info("stopped leftover processes", run=run_id, processes=len(pids))
    return pids


def sweep_stale() -> list[int]:
    """Kill what loopback runs whose `meshctl up` (the pid in the run id) is gone left running."""
    pids = {run: run.removeprefix(netns.PREFIX) for _, run in marked()}
    stale = {run for run, pid in pids.items() if pid.isdigit() and not netns.alive(int(pid))}
    return [pid for run in sorted(stale) for pid in sweep(run)]


class LoopbackMesh(Mesh):
    """`up()` starts the control plane, a node agent and bookinfo with explicit-mode sidecars on
    loopback addresses; `down()` stops exactly that. The rest (apply, versions, pod) is Mesh's."""

    def __init__(self, run_dir: str | os.PathLike, *, workers: int = 1, say: Callable[[str], None] = print,
                 subnet: int | None = None, port_block: int | None = None) -> None:
        super().__init__(run_dir, workers=workers, say=say)
        self.subnet = free_subnet() if subnet is None else subnet
        self.port_block = port_block
        for n, pod in enumerate(self.layout.pods, start=1):
            pod.ip = self.address(1, n)
        self.cp_host = "127.0.0.1"
        self.env = {**os.environ, RUN_ENV: self.run_id}

    def address(self, role: int, n: int) -> str:
        """role 1: the pod, 2: its sidecar's outbound listeners, 3: its app."""
        return f"127.{self.subnet}.{role}.{n}"

    def outbound_host(self, pod: Pod) -> str:
        return self.address(2, self.layout.pods.index(pod) + 1)

    def app_host(self, pod: Pod) -> str:
        return self.address(3, self.layout.pods.index(pod) + 1)

    def ports(self, pod: Pod) -> PodPorts:
        assert self.port_block is not None
        return PodPorts.at(self.port_block + PORTS_PER_POD * self.layout.pods.index(pod))

    @property
    def port_base(self) -> int:
        """The control plane's (ZMESH_PORT_BASE)."""
        assert self.port_block is not None
        return self.port_block + CP_OFFSET

    @property
    def external(self) -> tuple[str, int]:
        assert self.port_block is not None
        return self.address(0, 99), self.port_block + EXTERNAL_OFFSET

    # ---- bring-up

    def up(self, timeout: float = 60.0) -> None:
        """Every step in order; raises MeshError (the caller runs `down()`)."""
        if not (BOOKINFO / "bookinfo.yaml").exists():
            raise MeshError(f"bookinfo samples not found at {BOOKINFO}")
        if swept := sweep_stale():
            self.say(f"stopped {len(swept)} processes left by a crashed earlier run")
        try:
            self._prepare_run_dir()
        except OSError as exc:
            raise MeshError(f"run directory {self.run_dir}: {exc}") from exc
        if self.port_block is None:
            self.port_block = free_block()
        self.env["ZMESH_PORT_BASE"] = str(self.port_base)
        self.state.info = {"pid": os.getpid(), "run_id": self.run_id, "mode": "explicit",
                           "key_dir": str(self.key_dir), "port_base": self.port_base}
        self.state.save()
        self._step("keys", self._keys)
        self._step("control plane (galley, pilot, citadel) on 127.0.0.1", self._control_plane)
        self._step(f"node agent {NODE}", self._node_agent)
        self._step(f"{len(self.layout.pods)} pods on 127.{self.subnet}.x.N (app, agent + explicit sidecar)",
                   self._pods)
        self._step("waiting for every sidecar to be ready and SYNCED", lambda: self.wait_ready(timeout))

    def _prepare_run_dir(self) -> None:
        old = self.run_dir / "state.json"
        if (self.run_dir / MARKER).exists() and old.exists():  # a crashed run's processes, by PID, first
            netns.teardown(netns.State.load(old), grace=1.0)
        super()._prepare_run_dir()

    def _keys(self) -> None:
        for name in ("galley", "pilot", "citadel", "meshctl", NODE, PROXY_KEY):
            keys.generate(self.key_dir, name)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Run `args` with our marker, output to `<logs>/<name>.log`; recorded before it can outlive us."""
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
        self.state.procs.append(netns.Proc(name, proc.pid, ""))
        self.state.save()
        return proc

    def _control_plane(self) -> None:
        for name in CONFIG_FILES:
            shutil.copy(BOOKINFO / name, self.config_dir / name)
        k, host, base = str(self.key_dir), self.cp_host, str(self.port_base)
        self._start("galley", self._meshctl("galley", "--keys", k, "--config-dir", str(self.config_dir),
                                            "--host", host, "--port-base", base))
        self._start("pilot", self._meshctl("pilot", "--keys", k, "--host", host, "--port-base", base))
        self._start("citadel", self._meshctl(
            "citadel", "--keys", k, "--host", host, "--port-base", base, "--ca-dir", str(self.run_dir / "ca"),
            "--pilot", endpoints.tcp("pilot", "rpc", host, self.port_base)))
        ext_host, ext_port = self.external
        self._start("external", self._app_command("external", "v1", ext_host, ext_port))

    def _app_command(self, app: str, version: str, host: str, port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "meshctl.localmesh.bookinfo", app,
                version, "--host", host, "--port", str(port), *extra]

    def _node_agent(self) -> None:
        self._write_workloads()
        host = self.cp_host
        self._start(NODE, self._meshctl(
            "nodeagent", "--keys", str(self.key_dir), "--name", NODE, "--run-dir", str(self.node_dir),
            "--workloads", str(self.node_dir / "workloads"), "--pilot-host", host, "--citadel-host", host,
            "--port-base", str(self.port_base), "--owner", f"{os.getuid()}:{os.getgid()}",
            "--metrics-host", host))

    def _pods(self) -> None:
        for pod in self.layout.pods:
            outbound, app = self.outbound_host(pod), self.app_host(pod)
            if pod.serves:
                self._start(f"{pod.name}.app", self._app_command(pod.app, pod.version, app, APP_PORT,
                                                                 "--upstream-host", outbound))
            ports = self.ports(pod)
            proxy = ["--id", pod.name, "--namespace", "default", "--labels",
                     f"app={pod.app},version={pod.version}", "--service-account", pod.service_account,
                     "--ip", pod.ip, "--keys", str(self.key_dir), "--name", PROXY_KEY,
                     "--relay", f"ipc://{self.node_dir}/cfg", "--pilot-host", self.cp_host,
                     "--port-base", str(self.port_base), "--workers", str(self.workers),
                     "--mode", "explicit", "--explicit-host", outbound, "--inbound-host", pod.ip,
                     "--inbound-port", str(APP_PORT), "--app-host", app]
            agent = ["--health-port", str(ports.health), "--metrics-port", str(ports.metrics),
                     "--proxy-admin-port", str(ports.admin), "--proxy-stats-port", str(ports.stats),
                     "--handover-admin-port", str(ports.handover_admin),
                     "--handover-stats-port", str(ports.handover_stats),
                     "--decider-metrics-port", str(ports.decider_metrics),
                     "--certs", str(cert_dir(self.node_dir, pod.name)),
                     "--termination-drain-duration", "0.5"]
            self._start(f"{pod.name}.sidecar", self._meshctl("agent", *agent, "--", *proxy))

    # ---- readiness and status

    def _ready(self, pod: Pod) -> bool:
        """The pod's agent on its own health port (every pod shares the host's network)."""
        return self.http(None, "127.0.0.1", self.ports(pod).health, "/healthz/ready", timeout=1.0)[0] == 200

    def proxy_status(self) -> list[dict[str, Any]]:
        """`meshctl proxy-status -o json`."""
        return json.loads(netns.run(*self.proxy_status_command("-o", "json"), timeout=30))

    def proxy_status_command(self, *extra: str) -> list[str]:
        return self._meshctl("proxy-status", "--keys", str(self.key_dir), "--as", "meshctl", "--pilot",
                             endpoints.tcp("pilot", "rpc", self.cp_host, self.port_base), *extra)

    def http(self, pod: Pod | str | None, host: str, port: int, path: str,
             headers: dict[str, str] | None = None, timeout: float = 10.0,
             ns: str | None = None) -> tuple[int, bytes]:
        """A GET to `host`:`port` (no namespaces here: `pod` and `ns` are not used)."""
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def down(self) -> None:
        """Stop what was started (by PID), then anything still carrying this run's marker."""
        netns.teardown(self.state)
        sweep(self.run_id)
