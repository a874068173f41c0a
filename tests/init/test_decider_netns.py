"""The NFQUEUE decider for real, in the pod namespace of conftest.py, with rules from `--nfqueue 5`.

Its config knows one mesh service, VIPs 10.77.0.2 and fd77::2 port 8000; 10.77.0.3 is outside the mesh.
Once the decider has read it, its verdicts are also in the kernel (ISTIO_KNOWN, the fast path); the
queue sees SYNs before that, and after a re-install of the rules (which empties the chain).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable, wait_for
from tests.init.conftest import OTHER_IP, REMOTE_IP, REMOTE_IP6, RP, XP, Sidecar, Topology, run

try:
    import netfilterqueue  # noqa: F401
except ImportError:
    unavailable("the NetfilterQueue package (and libnetfilter-queue) is missing")

QUEUE = "5"
METRICS_PORT = 9100


def write_config(path: Path, policy: str) -> None:
    """Replace the file in one rename, as the agent will."""
    config = {"version": policy, "listeners": {"outbound_traffic_policy": policy, "outbound": [
        {"name": "mesh_8000", "service": "mesh.default.svc", "addresses": [REMOTE_IP, REMOTE_IP6],
         "port": RP, "protocol": "TCP"}]}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


def start_decider(topo: Topology, config: Path) -> tuple[subprocess.Popen, Path]:
    args = [sys.executable, "-m", "dataplane.init", "decider", "--queue", QUEUE, "--config", str(config),
            "--metrics-port", str(METRICS_PORT)]
    try:
        return topo.start("decider", args, "decider ready", stream="err")
    except AssertionError as exc:
        if "Failed to create queue" in str(exc):
            unavailable(f"NFQUEUE is not available in this kernel: {exc}")
        raise


def verdicts(topo: Topology) -> dict[str, float]:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    text = run(*topo.exec(sys.executable, "-c", fetch)).stdout
    found = re.findall(r'^zmesh_init_verdicts_total\{verdict="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {verdict: float(value) for verdict, value in found}


def test_verdicts_and_fail_open(sidecar: Sidecar, clean: Topology, tmp_path: Path) -> None:
    config = tmp_path / "proxy.json"
    write_config(config, "ALLOW_ANY")
    clean.init("--nfqueue", QUEUE, "--queue-bypass", *(() if clean.ipv6 else ("--no-ipv6",)))
    decider, log = start_decider(clean, config)
    assert wait_for(lambda: "fast path updated" in log.read_text(), 5), log.read_text()
    assert f"-A ISTIO_KNOWN -d {REMOTE_IP}/32 -j MARK" in clean.save(4)
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"  # a mesh destination
    if clean.ipv6:
        assert sidecar.outbound(REMOTE_IP6, RP) == "proxy"
    assert sidecar.outbound(REMOTE_IP, XP) == "proxy"  # any port of a VIP
    assert sidecar.outbound(OTHER_IP, RP) == "direct"  # ALLOW_ANY: the rest goes straight out

    write_config(config, "REGISTRY_ONLY")
    decider.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "policy=REGISTRY_ONLY" in log.read_text(), 5), log.read_text()
    refused = clean.connect(OTHER_IP, RP)
    assert not refused["ok"] and refused["error"] == "ConnectionRefusedError", refused
    assert refused["elapsed"] < 0.5  # a TCP reset at once, not a dropped SYN retried for seconds
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"
    assert sidecar.outbound(OTHER_IP, RP, as_proxy=True) == "direct"  # the proxy's own: never queued

    counts = verdicts(clean)  # the queue's and the fast path's
    assert counts["redirect"] >= 3 and counts["pass"] >= 1 and counts["reject"] >= 1, counts

    decider.kill()
    decider.wait(5)
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"  # the fast path outlives the decider
    assert not clean.connect(OTHER_IP, RP)["ok"]  # ... REGISTRY_ONLY included
    clean.init("--nfqueue", QUEUE, "--queue-bypass", *(() if clean.ipv6 else ("--no-ipv6",)))  # empties it
    assert sidecar.outbound(REMOTE_IP, RP) == "direct"  # --queue-bypass: it flows, past the proxy
    assert sidecar.outbound(OTHER_IP, RP) == "direct"


def test_no_config_yet_then_a_new_file_then_fail_closed(sidecar: Sidecar, clean: Topology,
                                                        tmp_path: Path) -> None:
    config = tmp_path / "late.json"
    clean.init("--no-ipv6", "--nfqueue", QUEUE)
    decider, log = start_decider(clean, config)
    assert sidecar.outbound(OTHER_IP, RP) == "proxy"  # no config yet: the proxy sees everything, as in Istio
    write_config(config, "ALLOW_ANY")  # no SIGHUP: the decider notices the file
    assert wait_for(lambda: "config loaded" in log.read_text(), 5), log.read_text()
    assert sidecar.outbound(OTHER_IP, RP) == "direct"
    clean.init("--no-ipv6", "--nfqueue", QUEUE)  # a re-install empties the fast path ...
    assert "-A ISTIO_KNOWN" not in clean.save(4)
    assert sidecar.outbound(OTHER_IP, RP) == "direct"  # ... the queue decides, and the decider notices
    assert wait_for(lambda: f"-A ISTIO_KNOWN -d {REMOTE_IP}/32" in clean.save(4), 5), log.read_text()

    decider.kill()
    decider.wait(5)
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"  # marked in the kernel: no decider needed
    clean.init("--no-ipv6", "--nfqueue", QUEUE)  # a re-install empties the fast path
    failed = clean.connect(REMOTE_IP, RP, timeout=1.0)  # without --queue-bypass nobody answers the queue
    assert not failed["ok"] and failed["error"] == "TimeoutError", failed
