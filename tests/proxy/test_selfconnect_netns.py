"""Issue 12 item 2 in transparent mode: a client in the pod connecting straight to the sidecar's own
ports (15001, 15006, 15000) must not make the sidecar connect to itself until it runs out of fds.

The test makes a namespace with its loopback and a veth pair (the pod's address POD_IP on one end,
nothing leaves the namespace), runs an app on POD_IP:APP_PORT and `meshctl proxy` in transparent mode
on the real 15001/15006/15000/15090 with gid 1337, and adds Istio's outbound redirect for the app's
address (`! --gid-owner 1337`, so the proxy's own connections go straight out). Without iptables rules
for the proxy's own ports (Istio has none either: 127.0.0.1 and the pod's own address are not
redirected), a connection to them reaches the listener unredirected, its original destination is the
listener itself, and the passthrough is blackholed instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, wait_for
from tests.proxy.test_interception import PROXY_GID, NsProcs, netns, nsprocs, run  # noqa: F401 (fixtures)
from tests.proxy.test_sidecar import tcp_config

POD_IP = "10.79.0.1"
APP_PORT = 9080
OWN = [("127.0.0.1", 15001), (POD_IP, 15001), (POD_IP, 15006), ("127.0.0.1", 15006)]
REQUEST = "GET / HTTP/1.1\r\nHost: unknown.example\r\n\r\n"

SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:15090/metrics", timeout=5).read().decode())
"""


def in_ns(ns: str, *args: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def connect(ns: str, host: str, port: int, msg: str = REQUEST) -> dict[str, object]:
    return json.loads(in_ns(ns, "-m", "tests.init.nsapp", "connect", host, str(port), msg, "5"))


@pytest.mark.timeout(600)  # a fresh machine may first have to apt-get install iptables
def test_connections_to_the_sidecars_own_ports_are_blackholed_and_the_pod_keeps_working(
        netns: str, nsprocs: NsProcs, tmp_path: Path) -> None:  # noqa: F811 (fixtures)
    run("ip", "-n", netns, "link", "add", "zs0", "type", "veth", "peer", "name", "zs1")
    run("ip", "-n", netns, "addr", "add", f"{POD_IP}/24", "dev", "zs0")
    for dev in ("zs0", "zs1"):
        run("ip", "-n", netns, "link", "set", dev, "up")

    app, app_out, app_err = nsprocs.start("app", [sys.executable, "-m", "tests.init.nsapp", "serve", "app",
                                                  f"{POD_IP}:{APP_PORT}"])
    assert wait_for(lambda: "ready" in app_out.read_text() or app.poll() is not None, 10), app_err.read_text()
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(tcp_config("v1", 7070, 7071)))  # one service, not the app's: passthrough
    proxy, _, proxy_err = nsprocs.start(
        "proxy", [sys.executable, "-m", "meshctl", "proxy", "--id", "pod-1", "--ip", POD_IP,
                  "--mode", "transparent", "--config", str(config), "--workers", "1", "--no-access-log"],
        group=PROXY_GID, extra_groups=[])
    assert wait_for(lambda: "config applied" in proxy_err.read_text() or proxy.poll() is not None, 15)
    assert proxy.poll() is None, proxy_err.read_text()
    run("ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", POD_IP,
        "--dport", str(APP_PORT), "-m", "owner", "!", "--gid-owner", str(PROXY_GID), "-j", "REDIRECT",
        "--to-ports", "15001")

    def through_proxy() -> dict[str, object]:
        result = connect(netns, POD_IP, APP_PORT, "to the app")
        assert result["ok"], result
        reply = result["reply"]
        assert isinstance(reply, dict) and reply["tag"] == "app" and reply["data"] == "to the app"
        assert reply["peer"] != result["local"]  # not direct: the proxy made the connection
        return reply

    through_proxy()
    (worker,) = psutil.Process(proxy.pid).children()
    fds = worker.num_fds()

    rounds = 2
    for _ in range(rounds):
        for host, port in OWN:
            result = connect(netns, host, port)
            assert not result["ok"] and "reply" not in result, (host, port, result)  # closed, no answer
    admin = connect(netns, POD_IP, 15000)  # the admin listens on 127.0.0.1 only
    assert admin["error"] == "ConnectionRefusedError", admin
    assert wait_for(lambda: worker.num_fds() <= fds), (fds, worker.num_fds())
    through_proxy()  # the sidecar still works

    metrics = in_ns(netns, "-c", SCRAPE)
    blackholed = rounds * len(OWN)
    none_healthy = 'envoy_cluster_upstream_cx_none_healthy{cluster_name="BlackHoleCluster"}'
    assert f"{none_healthy} {blackholed}" in metrics
    opened = [line for line in metrics.splitlines() if line.startswith("istio_tcp_connections_opened_total")
              and 'destination_service="BlackHoleCluster"' in line and 'response_flags="UH"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in opened) == blackholed, opened  # 15001's and 15006's
    logged = [line for line in proxy_err.read_text().splitlines() if "own listener" in line]
    assert logged and "protocol=tcp" in logged[0], proxy_err.read_text()
