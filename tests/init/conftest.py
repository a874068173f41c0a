"""A pod and a remote host, each in a network namespace made for the test, joined by a veth pair.

    pod    (zm-init-<hex>-p)  zi0 10.77.0.1/24 fd77::1/64   the app, its sidecar (uid/gid 1337), our rules
    remote (zm-init-<hex>-r)  zi1 10.77.0.2/24 10.77.0.3/24 fd77::2/64   servers "outside" the pod

The `sidecar` fixture adds Istio's cast: in the pod an app (tag "app") on 9080, 9081 and the
sidecar's 15021, a transparent L4 proxy on 15001 as uid/gid 1337 (it logs each connection with its
SO_ORIGINAL_DST), and an inbound recorder on 15006 that answers with the original destination; the
remote serves (tag "remote") on 10.77.0.2 and 10.77.0.3. A connection went direct when the server saw
the client's own address as its peer, and through the proxy when the proxy logged it (the server
then sees the proxy's port).

Nothing leaves the two namespaces. Every process is started with `ip netns exec` and stopped by PID
at teardown (such processes outlive `ip netns del`), then both namespaces are deleted. Both tables
start with a few foreign rules (another tool's), which our install must keep and our cleanup must leave.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, unavailable, wait_for

PROXY_ID = "1337"
POD_IP, REMOTE_IP, OTHER_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3"
POD_IP6, REMOTE_IP6 = "fd77::1", "fd77::2"
FOREIGN = {
    4: "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -d 10.99.0.0/16 -j RETURN\n-A OUTPUT -d 10.99.0.0/16 -j FOREIGN\n"
       "-A PREROUTING -d 10.99.0.0/16 -j RETURN\nCOMMIT\n"
       "*mangle\n-A OUTPUT -d 10.99.0.0/16 -j RETURN\nCOMMIT\n"
       "*filter\n-A OUTPUT -d 10.99.0.0/16 -j ACCEPT\nCOMMIT\n",
    6: "*nat\n-A OUTPUT -d fd99::/16 -j RETURN\nCOMMIT\n*mangle\n-A OUTPUT -d fd99::/16 -j RETURN\nCOMMIT\n"
       "*filter\n-A OUTPUT -d fd99::/16 -j ACCEPT\nCOMMIT\n",
}
RP, XP = 8000, 8001  # remote ports
AP, XAP = 9080, 9081  # the app's ports
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


def missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in ("ip", "iptables-restore", "iptables-save", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make deps` installs iproute2, iptables, util-linux)"
    return None


def run(*args: str, check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check, cwd=ROOT, **kw)


class Topology:
    """The two namespaces and what runs in them."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.pod, self.remote = f"{name}-p", f"{name}-r"
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.ipv6 = False

    def exec(self, *args: str, ns: str | None = None, as_proxy: bool = False) -> list[str]:
        """The command line that runs `args` in a namespace (as the proxy's uid and gid if asked)."""
        proxy = ["setpriv", f"--reuid={PROXY_ID}", f"--regid={PROXY_ID}", "--clear-groups"]
        return ["ip", "netns", "exec", ns or self.pod, *(proxy if as_proxy else []), *args]

    def start(self, name: str, args: list[str], ready: str, *, ns: str | None = None, as_proxy: bool = False,
              stream: str = "out") -> tuple[subprocess.Popen, Path]:
        """Start a process and wait (at most 10 s) until `ready` appears in its stdout or stderr."""
        out, err = self.tmp / f"{name}.out", self.tmp / f"{name}.err"
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(self.exec(*args, ns=ns, as_proxy=as_proxy), stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL, cwd=ROOT)
        self.procs.append(proc)
        watched = out if stream == "out" else err
        assert wait_for(lambda: ready in watched.read_text() or proc.poll() is not None, 10), name
        assert proc.poll() is None, f"{name} died: {err.read_text()}"
        return proc, err

    def serve(self, name: str, tag: str, *addrs: str, ns: str | None = None) -> None:
        self.start(name, [sys.executable, "-m", "tests.init.nsapp", "serve", tag, *addrs], "ready", ns=ns)

    def connect(self, host: str, port: int, msg: str = "hi", *, ns: str | None = None, as_proxy: bool = False,
                timeout: float = 5.0) -> dict[str, Any]:
        done = run(*self.exec(sys.executable, "-m", "tests.init.nsapp", "connect", host, str(port), msg,
                              str(timeout), ns=ns, as_proxy=as_proxy), timeout=timeout + 20)
        return json.loads(done.stdout)

    def init(self, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
        """Our CLI, inside the pod."""
        done = run(*self.exec(sys.executable, "-m", "dataplane.init", "iptables", *flags), check=False)
        assert not check or done.returncode == 0, done.stderr
        return done

    def save(self, family: int = 4) -> str:
        """iptables-save without its timestamps and counters, to compare states."""
        text = run(*self.exec(SAVE[family])).stdout
        return "\n".join(re.sub(r"\[\d+:\d+\]", "[-]", line) for line in text.splitlines()
                         if not line.startswith("#"))

    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def proxy_lines(log: Path) -> list[dict[str, str]]:
    """The transparent proxy's connection log: one dict per proxied connection."""
    lines = log.read_text().splitlines()
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines if "msg=tcp" in line]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    if reason := missing():
        unavailable(reason)
    topo = Topology(f"zm-init-{secrets.token_hex(3)}", tmp_path_factory.mktemp("netns"))
    made: list[str] = []
    try:
        for ns in (topo.pod, topo.remote):
            added = run("ip", "netns", "add", ns, check=False)
            if added.returncode:
                unavailable(f"cannot create a network namespace: {added.stderr.strip()}")
            made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", topo.pod, "link", "add", "zi0", "type", "veth", "peer", "name", "zi1",
            "netns", topo.remote)
        for ns, dev, addrs in ((topo.pod, "zi0", [POD_IP]), (topo.remote, "zi1", [REMOTE_IP, OTHER_IP])):
            for addr in addrs:
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        topo.ipv6 = all(run("ip", "-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad",
                            check=False).returncode == 0
                        for ns, dev, addr in ((topo.pod, "zi0", POD_IP6), (topo.remote, "zi1", REMOTE_IP6)))
        loaded = run(*topo.exec(RESTORE[4], "--noflush"), input=FOREIGN[4], check=False)
        if loaded.returncode:
            unavailable(f"iptables-restore does not work in a namespace here: {loaded.stderr.strip()}")
        if topo.ipv6:
            loaded = run(*topo.exec(RESTORE[6], "--noflush"), input=FOREIGN[6], check=False)
            topo.ipv6 = loaded.returncode == 0
        yield topo
    finally:
        topo.stop()
        for ns in made:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def clean(topology: Topology) -> Iterator[Topology]:
    """The topology with none of our rules, before and after the test."""
    before = {family: topology.save(family) for family in topology.families()}
    yield topology
    topology.init("--cleanup", *(() if topology.ipv6 else ("--no-ipv6",)))
    for family in topology.families():
        assert topology.save(family) == before[family]


@dataclass
class Sidecar:
    topo: Topology
    log: Path
    log6: Path | None

    def outbound(self, host: str, port: int, *, as_proxy: bool = False) -> str:
        """'proxy' or 'direct': how a connection from the pod to host:port got there."""
        log = self.log6 if ":" in host else self.log
        assert log is not None
        before = len(proxy_lines(log))
        result = self.topo.connect(host, port, f"to {host}:{port}", as_proxy=as_proxy)
        assert result["ok"], result
        assert result["reply"]["tag"] == "remote" and result["reply"]["data"] == f"to {host}:{port}"
        if result["reply"]["peer"] == result["local"]:
            return "direct"
        assert wait_for(lambda: len(proxy_lines(log)) > before, 5), "neither direct nor through the proxy"
        line = proxy_lines(log)[-1]
        assert line["orig_dst"] == line["upstream"] == f"{host}:{port}"  # read back through SO_ORIGINAL_DST
        return "proxy"

    def inbound(self, port: int, **kw: Any) -> str:
        """Who answered a connection to the pod's address: 'app', or 'inbound' (redirected to 15006)."""
        result = self.topo.connect(POD_IP, port, **kw)
        assert result["ok"], result
        reply = result["reply"]
        if reply["tag"] == "inbound":
            assert reply["orig"] == f"{POD_IP}:{port}" and reply["local"].endswith(":15006")
        else:
            assert reply["local"].endswith(f":{port}")
        return reply["tag"]


@pytest.fixture(scope="module")
def sidecar(topology: Topology) -> Sidecar:
    topo = topology
    v6 = [f"[{REMOTE_IP6}]:{RP}"] if topo.ipv6 else []
    topo.serve("remote", "remote", f"{REMOTE_IP}:{RP}", f"{OTHER_IP}:{RP}", f"{REMOTE_IP}:{XP}", *v6,
               ns=topo.remote)
    topo.serve("app", "app", f"0.0.0.0:{AP}", f"0.0.0.0:{XAP}", "0.0.0.0:15021")
    topo.serve("inbound", "inbound", "0.0.0.0:15006")
    proxy = [sys.executable, "-m", "tests.proxy.l4harness", "--transparent", "--log-connections",
             "--connect-timeout", "2", "--listen"]
    _, log = topo.start("proxy", [*proxy, "127.0.0.1:15001"], "listening", as_proxy=True)
    log6 = topo.start("proxy6", [*proxy, "[::1]:15001"], "listening", as_proxy=True)[1] if topo.ipv6 else None
    return Sidecar(topo, log, log6)
