"""Bring up the whole mesh on one machine: control plane, a node agent, bookinfo pods with sidecars.

    <run-id>-br   the node's network: bridge br0 10.244.N.1, the node agent, routes to "the internet"
    <run-id>-cp   galley (watching <run-dir>/config), pilot, citadel       10.244.N.2
    <run-id>-<p>  one per pod: the app, istio-init's rules, agent + proxy  10.244.N.10...
    <run-id>-net  "the internet": a server on 203.0.113.10:80 outside the mesh

Kubernetes objects come from Istio's bookinfo.yaml unchanged (Services, ServiceAccounts,
Deployments): one pod per Deployment, plus Istio's `sleep` client. Pod addresses reach pilot
the way a node agent reports them: one workload file per pod in the node agent's workloads
directory, which it registers with pilot (so endpoints carry the node, and citadel signs
only what runs there) and for which it writes certificates to `<run-dir>/certs/<pod>/`.
Service names resolve through each pod's /etc/netns hosts file to VIPs in 10.96.N.0/24,
which exist only inside the pods (the ClusterIP stand-in: iptables sends them to the sidecar).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bus import endpoints, keys
from meshapi import ports
from meshapi.identity import PROXY_UID, cert_dir
from meshctl.localmesh import netns

BOOKINFO = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "istio" / "bookinfo"
APP_PORT = 9080
EXTERNAL_IP, EXTERNAL_PORT = "203.0.113.10", 80
CONFIG_FILES = ("bookinfo.yaml", "destination-rule-all.yaml")
PROXY_KEY = "proxy"
NODE = "node-1"
MARKER = ".zmesh-run"


class MeshError(RuntimeError):
    """The mesh did not come up; the message says which step and why."""


@dataclass
class Pod:
    name: str              # the proxy id, Istio's pod name
    app: str
    version: str
    service_account: str
    ip: str
    ns: str = ""
    serves: bool = True     # False: a client only (sleep), no app process

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.app, "version": self.version}


@dataclass
class Layout:
    """Addresses of one run, from its subnet index N."""

    index: int
    pods: list[Pod] = field(default_factory=list)
    vips: dict[str, str] = field(default_factory=dict)  # service name -> VIP

    @property
    def bridge_ip(self) -> str:
        return f"10.244.{self.index}.1"

    @property
    def cp_ip(self) -> str:
        return f"10.244.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def vip_cidr(self) -> str:
        return f"10.96.{self.index}.0/24"


def bookinfo_layout(index: int, config_dir: Path = BOOKINFO) -> Layout:
    """Services and one pod per Deployment from bookinfo.yaml, and Istio's sleep client."""
    docs = [d for d in yaml.safe_load_all((config_dir / "bookinfo.yaml").read_text()) if isinstance(d, dict)]
    layout = Layout(index)
    services = sorted(d["metadata"]["name"] for d in docs if d.get("kind") == "Service")
    layout.vips = {name: f"10.96.{index}.{10 + i}" for i, name in enumerate(services)}
    deployments = sorted((d for d in docs if d.get("kind") == "Deployment"),
                         key=lambda d: d["metadata"]["name"])
    for i, d in enumerate(deployments):
        template = d["spec"]["template"]
        labels = template["metadata"]["labels"]
        layout.pods.append(Pod(f"{d['metadata']['name']}-0", labels["app"], labels.get("version", "v1"),
                               template["spec"].get("serviceAccountName", "default"),
                               f"10.244.{index}.{10 + i}"))
    layout.pods.append(Pod("sleep-0", "sleep", "v1", "sleep", f"10.244.{index}.{10 + len(deployments)}",
                           serves=False))
    return layout


def free_index() -> int:
    """A subnet index N whose 10.244.N.0/24, 10.245.N.0/30 and 10.96.N.0/24 the host does not use
    (the host veth makes ours visible there; flannel, for one, takes 10.244.0.0/16)."""
    used = netns.run("ip", "-4", "-o", "addr") + netns.run("ip", "-4", "route")
    for n in range(20 + os.getpid() % 200, 20 + os.getpid() % 200 + 236):
        index = 20 + (n - 20) % 236
        if not any(f"{net}.{index}." in used for net in ("10.244", "10.245", "10.96")):
            return index
    raise MeshError("no free 10.244.N.0/24 subnet on this host")


def hosts_file(layout: Layout, pod: Pod | None = None) -> str:
    """Kubernetes DNS names of every service at its VIP, and the pod's own name."""
    lines = [f"{pod.ip} {pod.name}"] if pod else []
    for name, vip in sorted(layout.vips.items()):
        lines.append(f"{vip} {name} {name}.default {name}.default.svc {name}.default.svc.cluster.local")
    return "\n".join(lines) + "\n"


def proxy_identity() -> list[str]:
    """The agent flags that run the proxy as Istio's 1337. Where uid 1337 cannot run this Python
    (it lives under a private home), gid 1337 alone: istio-init's rules exempt either."""
    try:
        ok = subprocess.run([sys.executable, "-c", "pass"], user=PROXY_UID, group=PROXY_UID, extra_groups=[],
                            capture_output=True, timeout=30).returncode == 0
    except PermissionError:
        ok = False
    return ["--proxy-uid", str(PROXY_UID), "--proxy-gid", str(PROXY_UID)] if ok else [
        "--proxy-gid", str(PROXY_UID)]


def _agent_supports(flag: str) -> bool:
    """Whether this build's `meshctl agent` has `flag` (features still arriving are wired when present)."""
    from dataplane.agent.cli import agent_command

    return any(flag in p.opts for p in agent_command.params)


class Mesh:
    """One mesh: `up()` builds and starts it, `down()` removes exactly what it made."""

    def __init__(self, run_dir: str | os.PathLike, *, host_access: bool = False, workers: int = 1,
                 say: Callable[[str], None] = print, index: int | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_id = f"{netns.PREFIX}{os.getpid()}"
        if index is None:
            index = free_index() if host_access else 20 + os.getpid() % 200
        self.layout = bookinfo_layout(index)
        self.host_access = host_access
        self.workers = workers
        self.say = say
        self.key_dir = self.run_dir / "keys"
        self.config_dir = self.run_dir / "config"
        self.node_dir = self.run_dir / NODE
        self.logs = self.run_dir / "logs"
        self.state = netns.State(str(self.run_dir / "state.json"))
        self.topo = netns.Topology(self.state, self.run_id)
        self.cp_ns = self.topo.ns_name("cp")
        self.net_ns = self.topo.ns_name("net")
        # the agent waits for the node agent's certificates and hands them to a proxy that takes them
        self.certs = _agent_supports("--certs")
        self.identity: list[str] = []

    # ---- bring-up

    def up(self, timeout: float = 60.0) -> None:
        """Every step in order; raises MeshError (the caller runs `down()`)."""
        if reason := netns.missing_tools():
            raise MeshError(reason)
        if not (BOOKINFO / "bookinfo.yaml").exists():
            raise MeshError(f"bookinfo samples not found at {BOOKINFO}")
        swept = netns.sweep_stale()
        if swept:
            self.say(f"removed {len(swept)} namespaces left by a crashed earlier run")
        self._prepare_run_dir()
        self.run_dir.chmod(0o755)  # sidecars running as 1337 reach their key and certificates below
        self.state.info = {"pid": os.getpid(), "run_id": self.run_id, "cp_ip": self.layout.cp_ip,
                           "key_dir": str(self.key_dir), "pod_cidr": self.layout.pod_cidr}
        self.state.save()
        self._step("keys", self._keys)
        self._step("network namespaces", self._network)
        self._step("control plane (galley, pilot, citadel)", self._control_plane)
        self._step(f"node agent {NODE}", self._node_agent)
        self._step(f"{len(self.layout.pods)} pods (istio-init rules, app, agent + sidecar as 1337)",
                   self._pods)
        self._step("waiting for every sidecar to be ready and SYNCED", lambda: self.wait_ready(timeout))

    def _prepare_run_dir(self) -> None:
        """A fresh run directory, replacing one of ours; never one we did not make."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not (self.run_dir / MARKER).exists():
                raise MeshError(f"{self.run_dir} is not empty and not a run directory of ours")
            shutil.rmtree(self.run_dir)
        for d in (self.run_dir, self.logs, self.config_dir, self.node_dir / "workloads"):
            d.mkdir(parents=True, exist_ok=True)
        (self.run_dir / MARKER).write_text("meshctl up's run directory: `meshctl up` replaces it\n")

    def _step(self, what: str, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        self.say(f"- {what} ...")
        try:
            fn()
        except (netns.NetnsError, OSError, subprocess.SubprocessError) as exc:
            raise MeshError(f"{what}: {exc}") from exc
        self.say(f"  done in {time.monotonic() - started:.1f}s")

    def _keys(self) -> None:
        for name in ("galley", "pilot", "citadel", "meshctl", NODE, PROXY_KEY):
            keys.generate(self.key_dir, name)
        # the sidecars run as 1337 and read their own key; the rest stays root's
        for suffix in (".key_secret", ".sign"):
            os.chown(self.key_dir / f"{PROXY_KEY}{suffix}", PROXY_UID, PROXY_UID)

    def _network(self) -> None:
        lay = self.layout
        self.topo.make_bridge(f"{lay.bridge_ip}/24")
        self.topo.routed(self.topo.add_ns("net"), "203.0.113.1/24", f"{EXTERNAL_IP}/24", "203.0.113.1")
        self.topo.attach(self.topo.add_ns("cp", hosts_file(lay)), f"{lay.cp_ip}/24", lay.bridge_ip)
        for pod in lay.pods:
            pod.ns = self.topo.add_ns(pod.name.rsplit("-", 1)[0], hosts_file(lay, pod))
            self.topo.attach(pod.ns, f"{pod.ip}/24", lay.bridge_ip)
        if self.host_access:
            link = f"{self.run_id}h"
            self.topo.host_access(link, f"10.245.{lay.index}.1/30", f"10.245.{lay.index}.2/30",
                                  [lay.pod_cidr, "203.0.113.0/24"])

    def _meshctl(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "meshctl", *args]

    def _control_plane(self) -> None:
        for name in CONFIG_FILES:
            shutil.copy(BOOKINFO / name, self.config_dir / name)
        k = str(self.key_dir)
        ip = self.layout.cp_ip
        pilot_rpc = endpoints.tcp("pilot", "rpc", ip)
        # galley's bus stays on loopback (pilot, beside it, is its one reader); its metrics, like
        # pilot's and citadel's, on the namespace's address, where the host's Prometheus reaches them
        self.topo.start("galley", self.cp_ns, self._meshctl("galley", "--keys", k, "--config-dir",
                                                            str(self.config_dir), "--metrics-host", ip),
                        self.logs)
        self.topo.start("pilot", self.cp_ns, self._meshctl("pilot", "--keys", k, "--host", ip), self.logs)
        self.topo.start("citadel", self.cp_ns, self._meshctl("citadel", "--keys", k, "--host", ip, "--ca-dir",
                                                             str(self.run_dir / "ca"), "--pilot", pilot_rpc),
                        self.logs)
        self.topo.start("external", self.net_ns, [sys.executable, "-m", "meshctl.localmesh.bookinfo",
                                                  "external", "v1", "--port", str(EXTERNAL_PORT)], self.logs)

    def _write_workloads(self) -> None:
        """One node-agent workload file per pod: the agent registers it and issues its certificate."""
        for pod in self.layout.pods:
            workload = {"id": pod.name, "namespace": "default", "service_account": pod.service_account,
                        "ip": pod.ip, "labels": pod.labels, "ports": {"http": APP_PORT} if pod.serves else {}}
            (self.node_dir / "workloads" / f"{pod.name}.yaml").write_text(yaml.safe_dump(workload))

    def _node_agent(self) -> None:
        self._write_workloads()
        ip = self.layout.cp_ip
        self.topo.start(NODE, self.topo.bridge, self._meshctl(
            "nodeagent", "--keys", str(self.key_dir), "--name", NODE, "--run-dir", str(self.node_dir),
            "--workloads", str(self.node_dir / "workloads"), "--pilot-host", ip, "--citadel-host", ip,
            "--owner", f"{PROXY_UID}:{PROXY_UID}", "--metrics-host", self.layout.bridge_ip), self.logs)

    def _pods(self) -> None:
        self.identity = proxy_identity()
        if "--proxy-uid" not in self.identity:
            self.say(f"  uid {PROXY_UID} cannot run {sys.executable}: "
                     f"the sidecars run as gid {PROXY_UID} only")
        for pod in self.layout.pods:
            init = self._meshctl("iptables", "-p", str(ports.OUTBOUND), "-z", str(ports.INBOUND),
                                 "-u", str(PROXY_UID), "-m", "REDIRECT", "-i", "*", "-b", "*", "--no-ipv6")
            netns.run("ip", "netns", "exec", pod.ns, *init)
            if pod.serves:
                app = [sys.executable, "-m", "meshctl.localmesh.bookinfo", pod.app, pod.version,
                       "--port", str(APP_PORT)]
                self.topo.start(f"{pod.name}.app", pod.ns, app, self.logs)
            proxy = ["--id", pod.name, "--namespace", "default", "--labels",
                     f"app={pod.app},version={pod.version}",
                     "--service-account", pod.service_account, "--ip", pod.ip, "--keys", str(self.key_dir),
                     "--name", PROXY_KEY, "--relay", f"ipc://{self.node_dir}/cfg", "--pilot-host",
                     self.layout.cp_ip, "--workers", str(self.workers)]
            certs = ["--certs", str(cert_dir(self.node_dir, pod.name))] if self.certs else []
            self.topo.start(f"{pod.name}.sidecar", pod.ns, self._meshctl(
                "agent", *self.identity, *certs, "--termination-drain-duration", "0.5", "--", *proxy),
                self.logs)

    # ---- readiness and status

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = {pod.name: pod for pod in self.layout.pods}
        while waiting and time.monotonic() < deadline:
            self._check_alive()
            for name, pod in list(waiting.items()):
                with contextlib.suppress(OSError):
                    if self._ready(pod):
                        del waiting[name]
            time.sleep(0.2)
        if waiting:
            raise MeshError(f"not ready after {timeout:g}s: {', '.join(sorted(waiting))} (logs: {self.logs})")
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.proxy_status()
            if len(rows) == len(self.layout.pods) and all(r["state"] == "SYNCED" for r in rows):
                return
            time.sleep(0.3)
        raise MeshError(f"proxies not SYNCED after {timeout:g}s: {rows}")

    def _ready(self, pod: Pod) -> bool:
        """The pod's agent says ready (15021 in the pod's namespace); OSError while it cannot answer."""
        return self.http(pod, "127.0.0.1", ports.HEALTH, "/healthz/ready", timeout=1.0)[0] == 200

    def _check_alive(self) -> None:
        dead = [p.name for p in self.state.procs if not netns.alive(p.pid)]
        if dead:
            raise MeshError(f"exited: {', '.join(dead)} (see {self.logs})")

    def proxy_status(self) -> list[dict[str, Any]]:
        """`meshctl proxy-status -o json`, run from the node's network."""
        out = netns.run("ip", "netns", "exec", self.topo.bridge, *self.proxy_status_command("-o", "json"))
        return json.loads(out)

    def proxy_status_command(self, *extra: str) -> list[str]:
        return self._meshctl("proxy-status", "--keys", str(self.key_dir), "--as", "meshctl", "--pilot",
                             endpoints.tcp("pilot", "rpc", self.layout.cp_ip), *extra)

    def versions(self) -> dict[str, str]:
        return {r["proxy"]: r["acked"] for r in self.proxy_status()}

    def apply(self, name: str, text: str | None, timeout: float = 20.0) -> None:
        """Write (or with None remove) a config file in galley's directory; return once pilot has
        pushed a new version to the proxies it concerns and every proxy is SYNCED again."""
        before = self.versions()
        path = self.config_dir / name
        if text is None:
            path.unlink()
        else:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.proxy_status()
            if (len(rows) == len(before) and all(r["state"] == "SYNCED" for r in rows)
                    and any(r["acked"] != before.get(r["proxy"]) for r in rows)):
                return
            time.sleep(0.2)
        raise MeshError(f"{name}: no proxy ACKed a new version within {timeout:g}s (an invalid file is "
                        f"rejected: see {self.logs / 'galley.log'}): {rows}")

    def metrics_endpoints(self) -> dict[str, str]:
        """Every Prometheus endpoint of the mesh, by the process (`state.procs` name) serving it, as
        a Prometheus on the node's network or, with host_access, on the host scrapes it. A pod has
        two: its agent's merged one (`<pod>.sidecar`, 15020, the one to scrape, as Istio's
        prometheus.io annotations say) and its proxy's own (`<pod>.proxy`, 15090, part of the
        first: scraping both doubles every istio_* series)."""
        lay = self.layout
        urls = {name: f"http://{lay.cp_ip}:{endpoints.port(name, 'metrics')}/metrics"
                for name in ("galley", "pilot", "citadel")}
        urls[NODE] = f"http://{lay.bridge_ip}:{endpoints.port('nodeagent', 'metrics')}/metrics"
        for pod in lay.pods:
            urls[f"{pod.name}.sidecar"] = f"http://{pod.ip}:{ports.AGENT_METRICS}" \
                                          "/stats/prometheus"
            urls[f"{pod.name}.proxy"] = f"http://{pod.ip}:{ports.PROXY_METRICS}" \
                                        "/stats/prometheus"
        return urls

    def pod(self, name: str) -> Pod:
        """By pod name, Deployment name or (the first of) app."""
        for pod in self.layout.pods:
            if name in (pod.name, pod.name.rsplit("-", 1)[0], pod.app):
                return pod
        raise KeyError(f"no pod {name!r}")

    def http(self, pod: Pod | str | None, host: str, port: int, path: str,
             headers: dict[str, str] | None = None, timeout: float = 10.0,
             ns: str | None = None) -> tuple[int, bytes]:
        """A GET sent from inside a pod's network (as its app would: through the sidecar)."""
        where = ns or (pod if isinstance(pod, Pod) else self.pod(pod or "")).ns
        sock = netns.connect(where, host, port, timeout)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    # ---- chaos: killing a part and starting it again (tests/e2e/test_chaos.py)

    def pid_of(self, name: str) -> int:
        """The running process `name` was started as: galley, pilot, citadel, node-1, <pod>.sidecar
        (the agent), <pod>.app."""
        for proc in reversed(self.state.procs):
            if proc.name == name and netns.alive(proc.pid):
                return proc.pid
        raise MeshError(f"no running process {name!r} in this mesh")

    def kill_component(self, name: str, sig: int, timeout: float = 10.0) -> list[str]:
        """Send `sig` (a fatal one) to `name` and return once it is gone, with the command it ran
        (`ip netns exec` execs it, so the PID's command line is the component's own)."""
        pid = self.pid_of(name)
        command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while netns.alive(pid):
            if time.monotonic() > deadline:
                raise MeshError(f"{name} (pid {pid}) still runs {timeout:g}s after signal {sig}")
            time.sleep(0.02)
        return command

    def restart_component(self, name: str, command: list[str]) -> int:
        """Start `name` again in its namespace the way bring-up did (`command` from `kill_component`);
        returns the new PID. The dead process's record goes, so teardown never signals a reused PID."""
        dead = [p for p in self.state.procs if p.name == name and not netns.alive(p.pid)]
        if not dead:
            raise MeshError(f"{name} was never started or still runs")
        self.state.procs = [p for p in self.state.procs if p not in dead]
        return self.topo.start(name, dead[-1].ns, command, self.logs).pid

    # ---- teardown

    def down(self) -> None:
        netns.teardown(self.state)

