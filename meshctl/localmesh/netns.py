"""Network namespaces for a mesh on one machine, and exactly their removal.

Every namespace hangs off a bridge that lives in its own namespace, so the root namespace's
links, routes and rules stay untouched; the one exception is an optional veth giving the host
a route into the mesh (`meshctl up`). Each namespace gets `/etc/netns/<name>/hosts` and
`resolv.conf`, which `ip netns exec` mounts over /etc, so names resolve from the file and a
lookup never waits for a DNS server.

Everything made is written to a state file before it is made, so `meshctl down`, a test's
teardown and the safety net for crashed runs remove exactly it. Processes are stopped by PID
(and by `ip netns pids`): `ip netns del` does not kill what runs inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bus.logs import Log

PREFIX = "zml"  # zmesh-local: "zml<pid>-<role>"; the pid keeps parallel runs apart
_OURS = re.compile(rf"^{PREFIX}(\d+)-")
NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")
CLONE_NEWNET = 0x40000000

_log = Log("localmesh.netns")


class NetnsError(RuntimeError):
    """A command that builds the topology failed; the message has its stderr."""


def run(*args: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def missing_tools() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


@dataclass
class Proc:
    name: str
    pid: int
    ns: str


@dataclass
class State:
    """What one run made; saved after every addition."""

    path: str
    namespaces: list[str] = field(default_factory=list)
    host_link: str = ""
    procs: list[Proc] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        tmp = Path(self.path + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> State:
        data = json.loads(Path(path).read_text())
        return cls(str(path), data["namespaces"], data["host_link"], [Proc(**p) for p in data["procs"]],
                   data.get("info", {}))


class Topology:
    """A bridge namespace and namespaces wired to it (10.x.y.0/24 for pods, another subnet outside)."""

    def __init__(self, state: State, run_id: str) -> None:
        self.state = state
        self.run_id = run_id
        self.bridge = self.ns_name("br")
        self._links = 0

    def ns_name(self, role: str) -> str:
        return f"{self.run_id}-{role}"

    def add_ns(self, role: str, hosts: str = "") -> str:
        name = self.ns_name(role)
        self.state.namespaces.append(name)
        self.state.save()
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        etc = ETC_NETNS / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
        # nothing answers on 127.0.0.1:53, so a name missing from hosts fails at once
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        return name

    def make_bridge(self, cidr: str) -> None:
        """The bridge namespace: br0 carries `cidr` (its first address) and forwards between links."""
        self.add_ns("br")
        run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge, "addr", "add", cidr, "dev", "br0")
        run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        # /proc/sys/net is the writer's namespace's (and sh is everywhere, sysctl is not)
        run("ip", "netns", "exec", self.bridge, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")

    def attach(self, ns: str, cidr: str, gateway: str) -> None:
        """A veth from `ns` (eth0, address `cidr`, default route via `gateway`) into the bridge."""
        self._links += 1
        peer = f"p{self._links}"
        run("ip", "-n", self.bridge, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", self.bridge, "link", "set", peer, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", gateway)

    def routed(self, ns: str, bridge_cidr: str, cidr: str, gateway: str) -> None:
        """A veth from `ns` to the bridge namespace on a subnet of its own (routed, not bridged)."""
        self._links += 1
        peer = f"r{self._links}"
        run("ip", "-n", self.bridge, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", self.bridge, "addr", "add", bridge_cidr, "dev", peer)
        run("ip", "-n", self.bridge, "link", "set", peer, "up")
        run("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", gateway)

    def host_access(self, link: str, host_cidr: str, bridge_cidr: str, routes: list[str]) -> None:
        """The one change to the root namespace: a veth into the bridge namespace and routes over it."""
        self.state.host_link = link
        self.state.save()
        run("ip", "link", "add", link, "type", "veth", "peer", "name", "host", "netns", self.bridge)
        run("ip", "addr", "add", host_cidr, "dev", link)
        run("ip", "link", "set", link, "up")
        run("ip", "-n", self.bridge, "addr", "add", bridge_cidr, "dev", "host")
        run("ip", "-n", self.bridge, "link", "set", "host", "up")
        gateway = bridge_cidr.split("/")[0]
        for route in routes:
            run("ip", "route", "add", route, "via", gateway, "dev", link)

    def start(self, name: str, ns: str, args: list[str], log_dir: Path) -> subprocess.Popen:
        """Run `args` in `ns`, output to `<log_dir>/<name>.log`; recorded before it can outlive us."""
        with (log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.state.procs.append(Proc(name, proc.pid, ns))
        self.state.save()
        return proc


# ---- talking into a namespace from this process


def _in_netns(ns: str, fn: Any) -> Any:
    """Call `fn` on a thread that has joined `ns`; objects it makes (sockets) stay in `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")  # a thread of its own: ours stays put
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket made inside `ns` and connected from there (so `ns`'s iptables apply to it)."""
    sock = _in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# ---- removal


def alive(pid: int) -> bool:
    """Whether `pid` runs; a child of ours that exited is reaped here (a zombie is not alive)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def ns_pids(ns: str) -> list[int]:
    out = run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def stop_pids(pids: list[int], grace: float) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            _signal(pid, signal.SIGKILL)


def remove_namespace(ns: str) -> None:
    """Kill whatever still runs in `ns`, delete it and its /etc/netns files."""
    if (NETNS_DIR / ns).exists():
        stop_pids(ns_pids(ns), 0.0)
        run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def teardown(state: State, grace: float = 3.0) -> None:
    """Remove what `state` records: processes (by PID), namespaces, the host link."""
    # pids we started are ours only while they still run in one of our namespaces
    pids = [p.pid for p in state.procs if alive(p.pid)]
    stop_pids(pids, grace)
    for ns in reversed(state.namespaces):
        remove_namespace(ns)
    if state.host_link and Path(f"/sys/class/net/{state.host_link}").exists():
        run("ip", "link", "del", state.host_link, check=False)
    Path(state.path).unlink(missing_ok=True)
    _log.info("removed", namespaces=len(state.namespaces), processes=len(pids))


def stale_namespaces() -> list[str]:
    """Namespaces with our prefix whose creating process is gone (a crashed earlier run)."""
    if not NETNS_DIR.exists():
        return []
    out = []
    for entry in sorted(os.listdir(NETNS_DIR)):
        m = _OURS.match(entry)
        if m and not alive(int(m.group(1))):
            out.append(entry)
    return out


def sweep_stale() -> list[str]:
    """Remove what crashed runs left: their namespaces and processes, and their host links."""
    gone = stale_namespaces()
    for ns in gone:
        remove_namespace(ns)
    for etc in ETC_NETNS.glob(f"{PREFIX}*") if ETC_NETNS.exists() else ():
        m = _OURS.match(etc.name)
        if m and not alive(int(m.group(1))):
            shutil.rmtree(etc, ignore_errors=True)
    for link in Path("/sys/class/net").glob(f"{PREFIX}*"):
        m = re.match(rf"^{PREFIX}(\d+)h$", link.name)
        if m and not alive(int(m.group(1))):
            run("ip", "link", "del", link.name, check=False)
    return gone
