"""The agent in a pod's network namespace (tests/init/conftest.py's topology), with Istio's rules:

* with `--decider-queue`, it runs the NFQUEUE decider and feeds it the proxy's applied config, so a
  service added to the proxy's config becomes REDIRECT with nothing restarted; it restarts a killed
  decider and merges its verdict counters into 15020;
* on SIGHUP it hands the proxy over to a new one under a stream of new connections: none fails.

The proxy runs in group 1337 (no group entry needed) in transparent mode, from a config file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, unavailable, wait_for
from tests.init.conftest import OTHER_IP, PROXY_ID, REMOTE_IP, RP, Topology, clean, run, topology

__all__ = ["clean", "topology"]  # the fixtures, for pytest

QUEUE = 7
READY, STOPPED = "hand-over: new proxy ready", 'msg="proxy stopped" component=agent'


def service(name: str, vip: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """An outbound TCP listener for `vip`:RP and its cluster, whose one endpoint is the VIP itself."""
    cluster = f"outbound|{RP}||{name}.default.svc.cluster.local"
    listener = {"name": f"{name}_{RP}", "service": f"{name}.default.svc.cluster.local", "addresses": [vip],
                "port": RP, "protocol": "TCP", "tcp_routes": [{"match": {}, "clusters": [
                    {"name": cluster, "weight": 100}]}]}
    endpoints = [{"address": vip, "port": RP, "weight": 1, "locality": "", "healthy": True, "labels": {},
                  "service_account": "", "tls_mode": "disabled"}]
    return listener, cluster, endpoints


def mesh_config(version: str, *vips: tuple[str, str]) -> dict[str, Any]:
    """Pilot's schema: one mesh service per (name, vip), ALLOW_ANY for the rest."""
    listeners, clusters, endpoints = [], {}, {}
    for name, vip in vips:
        listener, cluster, eps = service(name, vip)
        listeners.append(listener)
        clusters[cluster] = {"name": cluster, "direction": "outbound", "type": "EDS", "port": RP,
                             "service": listener["service"], "lb": {"simple": "ROUND_ROBIN"}}
        endpoints[cluster] = eps
    return {"version": version, "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "inbound": [],
                                              "outbound": listeners},
            "routes": {}, "clusters": clusters, "endpoints": endpoints,
            "security": {"mtls": {"mode": "PERMISSIVE", "ports": {}}, "authorization": []}}


@pytest.fixture
def config_dir() -> Iterator[Path]:
    """A directory the proxy (uid 1337) can read; pytest's tmp_path is root's only."""
    path = Path(tempfile.mkdtemp(prefix="zmesh-agent-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def get(topo: Topology, url: str) -> tuple[int, str]:
    """An HTTP GET from inside the pod: (status, body), (0, error) when nothing answers."""
    code = ("import json, urllib.request, urllib.error\n"
            f"try:\n    r = urllib.request.urlopen({url!r}, timeout=3); out = [r.status, r.read().decode()]\n"
            "except urllib.error.HTTPError as e:\n    out = [e.code, e.read().decode()]\n"
            "except OSError as e:\n    out = [0, str(e)]\n"
            "print(json.dumps(out))")
    status, body = json.loads(run(*topo.exec(sys.executable, "-c", code)).stdout)
    return status, body


def route(topo: Topology, host: str) -> str:
    """'proxy' or 'direct' for a new connection from the app to host:RP."""
    result = topo.connect(host, RP, "which way")
    assert result["ok"], result
    return "direct" if result["reply"]["peer"] == result["local"] else "proxy"


def start_agent(topo: Topology, config: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    # root in group 1337 (the rules exempt uid or gid 1337): the venv's python lives under root's home
    args = [sys.executable, "-m", "meshctl", "agent", "--proxy-gid", PROXY_ID,
            "--termination-drain-duration", "1", "--restart-initial", "0.2", *flags,
            "--", "--id", "pod-1", "--config", str(config), "--mode", "transparent", "--workers", "1",
            "--no-access-log"]
    proc, log = topo.start("agent", args, "agent started", stream="err")
    return proc, log


def stop_agent(agent: subprocess.Popen) -> int | None:
    """SIGTERM and wait; whatever is left of its tree is killed. Returns its exit code."""
    try:
        tree = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=5)
    return agent.returncode


PROXY = "-m dataplane.proxy "  # how the agent starts the proxy (agent.py)


def child_pids(agent: subprocess.Popen, word: str) -> list[int]:
    return [p.pid for p in psutil.Process(agent.pid).children() if word in " ".join(p.cmdline())]


def sample(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


@pytest.fixture(scope="module")
def servers(topology: Topology) -> Iterator[Topology]:
    topology.serve("remote", "remote", f"{REMOTE_IP}:{RP}", f"{OTHER_IP}:{RP}", ns=topology.remote)
    yield topology


def test_the_agent_runs_the_decider_on_the_proxys_config(servers: Topology, clean: Topology,
                                                         config_dir: Path) -> None:
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        unavailable("the NetfilterQueue package is missing")
    topo = clean
    config = config_dir / "proxy.json"
    write(config, mesh_config("v1", ("mesh", REMOTE_IP)))
    topo.init("--no-ipv6", "--nfqueue", str(QUEUE))  # fail closed: nothing flows until the decider runs
    agent, log = start_agent(topo, config, "--decider-queue", str(QUEUE))
    try:
        assert wait_for(lambda: get(topo, "http://127.0.0.1:15021/healthz/ready")[0] == 200, 20), \
            log.read_text()
        assert wait_for(lambda: "decider config updated" in log.read_text(), 10), log.read_text()
        assert "version=v1" in log.read_text()
        assert route(topo, REMOTE_IP) == "proxy"  # a mesh service
        assert route(topo, OTHER_IP) == "direct"  # ALLOW_ANY: the rest goes straight out

        # a new service in the mesh: the proxy applies it (SIGHUP re-reads its file), the agent sees
        # the new version in /config_dump and hands it to the decider; nothing restarts
        pids = child_pids(agent, "decider") + child_pids(agent, PROXY)
        write(config, mesh_config("v2", ("mesh", REMOTE_IP), ("other", OTHER_IP)))
        os.kill(child_pids(agent, PROXY)[0], signal.SIGHUP)
        assert wait_for(lambda: "version=v2" in log.read_text(), 10), log.read_text()
        assert wait_for(lambda: route(topo, OTHER_IP) == "proxy", 5)
        assert child_pids(agent, "decider") + child_pids(agent, PROXY) == pids

        # one scrape target: the decider's verdicts beside the agent's and the proxy's series
        text = get(topo, "http://127.0.0.1:15020/stats/prometheus")[1]
        assert (sample(text, "zmesh_init_verdicts_total", verdict="pass") or 0) >= 1, text  # the one queued
        assert f"-A ISTIO_KNOWN -d {OTHER_IP}/32 -j MARK" in topo.save(4)  # the new service: fast path
        assert sample(text, "zmesh_agent_decider_up") == 1

        # the decider dies: the agent says so, brings it back, and traffic is decided again
        decider = child_pids(agent, "decider")[0]
        os.kill(decider, signal.SIGKILL)
        assert wait_for(lambda: "decider exited; restarting" in log.read_text(), 5), log.read_text()
        assert wait_for(lambda: child_pids(agent, "decider") not in ([], [decider]), 10)
        assert wait_for(lambda: "decider ready" in log.read_text().split("decider exited")[-1], 10)
        assert route(topo, OTHER_IP) == "proxy" and route(topo, REMOTE_IP) == "proxy"
        text = get(topo, "http://127.0.0.1:15020/stats/prometheus")[1]
        assert sample(text, "zmesh_agent_decider_restarts_total") == 1
    finally:
        assert stop_agent(agent) == 0, log.read_text()


def test_sighup_hands_the_proxy_over_without_losing_a_connection(servers: Topology, clean: Topology,
                                                                 config_dir: Path) -> None:
    topo = clean
    config = config_dir / "proxy.json"
    write(config, mesh_config("v1", ("mesh", REMOTE_IP)))
    topo.init("--no-ipv6")
    agent, log = start_agent(topo, config)
    stopfile = config_dir / "stop"
    client = None
    try:
        assert wait_for(lambda: get(topo, "http://127.0.0.1:15021/healthz/ready")[0] == 200, 20), \
            log.read_text()
        old = child_pids(agent, PROXY)
        client, _ = topo.start("stream", [sys.executable, "-m", "tests.init.nsapp", "stream", REMOTE_IP,
                                          str(RP), "4", str(stopfile)], "streaming")
        for handovers in (1, 2):  # over to the hand-over ports, and back
            agent.send_signal(signal.SIGHUP)
            assert wait_for(lambda n=handovers: log.read_text().count(READY) == n, 20), log.read_text()
            assert wait_for(lambda n=handovers: log.read_text().count(STOPPED) == n, 15), log.read_text()
            assert client.poll() is None  # still streaming
        stopfile.write_text("")
        client.wait(30)
        counts = json.loads((topo.tmp / "stream.out").read_text().splitlines()[-1])
        assert counts["failed"] == 0 and counts["ok"] > 50, counts
        assert counts["direct"] == 0, counts  # every one went through a proxy
        new = child_pids(agent, PROXY)
        assert len(new) == 1 and new != old
        assert get(topo, "http://127.0.0.1:15000/ready")[0] == 200  # back on the first pair of ports
        assert get(topo, "http://127.0.0.1:15002/ready")[0] == 0  # the other pair is free again
        text = get(topo, "http://127.0.0.1:15020/stats/prometheus")[1]
        assert sample(text, "zmesh_agent_proxy_handovers_total", result="done") == 2
        assert run(*topo.exec("cat", "/proc/sys/net/ipv4/tcp_migrate_req")).stdout.strip() == "1"
    finally:
        stopfile.write_text("")
        if client is not None and client.poll() is None:
            client.kill()
        assert stop_agent(agent) == 0


def test_bad_handover_ports_are_refused_clearly() -> None:
    done = subprocess.run([sys.executable, "-m", "meshctl", "agent", "--handover-admin-port",
                           "15000", "--", "--id", "x"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2 and "hand-over ports must differ" in done.stderr
