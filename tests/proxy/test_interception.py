"""Transparent interception for real: iptables REDIRECT inside a network namespace, SO_ORIGINAL_DST.

The test makes its own namespace (only its loopback is up, so no traffic can leave it), runs an
echo backend on 127.0.0.2 and `python -m tests.proxy.l4harness --transparent` on 15001 inside it,
and adds Istio's outbound rule to the namespace's nat OUTPUT chain:

    -p tcp -d 127.0.0.2 --dport <backend> -m owner ! --gid-owner 1337 -j REDIRECT --to-ports 15001

The proxy runs with gid 1337 (uid stays root, as the test is) and the client with gid 0, so the
owner match tells them apart: the client's connection is redirected to the proxy, the proxy's own
upstream connection to the same address is not (otherwise it would loop back into itself).
Istio excludes its proxy by uid 1337 and gid 1337 the same way. The proxy logs each connection
with the original destination it read through SO_ORIGINAL_DST, which is what the test checks.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, unavailable, wait_for

PROXY_GID = 1337
BACKEND_IP = "127.0.0.2"

BACKEND = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
for _ in range(100):
    c, _ = s.accept()
    with c:
        c.sendall(b"echo:" + c.recv(1024))
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(sys.argv[3].encode())
    c.shutdown(socket.SHUT_WR)
    print(c.recv(1024).decode(), flush=True)
"""


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def have_iptables() -> str | None:
    """None when iptables is usable, else why not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make deps` installs {package})"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    if reason := have_iptables():
        unavailable(reason)
    name = f"zm-test-{secrets.token_hex(4)}"
    added = run("ip", "netns", "add", name, check=False)
    if added.returncode:
        unavailable(f"cannot create a network namespace: {added.stderr.strip()}")
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


class NsProcs:
    """Processes started inside the namespace; all stopped at teardown."""

    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns = ns
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], **kw: object) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.tmp / f"{name}.out", self.tmp / f"{name}.err"
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc, out, err

    def client(self, ip: str, port: int, msg: str, **kw: object) -> subprocess.CompletedProcess:
        """Connect from inside the namespace, send `msg`, return what came back (in stdout)."""
        args = ["ip", "netns", "exec", self.ns, sys.executable, "-c", CLIENT, ip, str(port), msg]
        return subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=ROOT,
                              **kw)  # type: ignore[call-overload]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def reply(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def nsprocs(netns: str, tmp_path: Path) -> Iterator[NsProcs]:
    procs = NsProcs(netns, tmp_path)
    yield procs
    procs.stop()


@pytest.mark.timeout(600)  # a fresh machine may first have to apt-get install iptables
def test_redirected_connection_is_proxied_to_its_original_destination(netns: str, nsprocs: NsProcs) -> None:
    port = free_port()  # a free number is free inside the fresh namespace too
    backend, backend_out, backend_err = nsprocs.start("backend", [sys.executable, "-c", BACKEND, BACKEND_IP,
                                                                  str(port)])
    assert wait_for(lambda: "ready" in backend_out.read_text() or backend.poll() is not None, 10)
    assert backend.poll() is None, backend_err.read_text()

    proxy, proxy_out, proxy_err = nsprocs.start(
        "proxy", [sys.executable, "-m", "tests.proxy.l4harness", "--listen", "127.0.0.1:15001",
                  "--transparent", "--log-connections", "--connect-timeout", "2"],
        group=PROXY_GID, extra_groups=[])
    assert wait_for(lambda: "listening" in proxy_out.read_text() or proxy.poll() is not None, 10)
    assert proxy.poll() is None, proxy_err.read_text()

    rule = ["-p", "tcp", "-d", BACKEND_IP, "--dport", str(port), "-m", "owner", "!", "--gid-owner",
            str(PROXY_GID), "-j", "REDIRECT", "--to-ports", "15001"]
    added = run("ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", *rule, check=False)
    if added.returncode:
        unavailable(f"iptables cannot add a nat REDIRECT rule here: {added.stderr.strip()}")

    assert reply(nsprocs.client(BACKEND_IP, port, "hello-through-proxy")) == "echo:hello-through-proxy"

    def logged() -> list[str]:
        return [line for line in proxy_err.read_text().splitlines() if 'msg=tcp' in line]

    assert wait_for(lambda: logged(), 5), proxy_err.read_text()
    (line,) = logged()
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert fields["orig_dst"] == f"{BACKEND_IP}:{port}"  # read back through SO_ORIGINAL_DST
    assert fields["upstream"] == f"{BACKEND_IP}:{port}"
    assert fields["flags"] == "-"
    assert fields["received"] == str(len("hello-through-proxy"))
    assert fields["sent"] == str(len("echo:hello-through-proxy"))

    # the proxy's group is exempt: the same connection made with gid 1337 goes straight through
    direct = nsprocs.client(BACKEND_IP, port, "direct", group=PROXY_GID, extra_groups=[])
    assert reply(direct) == "echo:direct"
    assert not wait_for(lambda: len(logged()) > 1, 0.5)

    # and without the proxy a redirected connection has nowhere to go
    proxy.terminate()
    proxy.wait(5)
    refused = nsprocs.client(BACKEND_IP, port, "x")
    assert refused.returncode != 0 and "ConnectionRefusedError" in refused.stderr
