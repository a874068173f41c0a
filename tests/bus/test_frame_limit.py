"""A frame over the size limit, from a peer with a known key, to the real pilot process: libzmq
drops the peer before allocating the frame, and pilot keeps serving everyone else."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import zmq

from bus import envelope as E
from bus.context import socket
from bus.keys import Keyring
from bus.rpc import RpcClient
from tests.bus.helpers import raw_client
from tests.conftest import ROOT, free_port_base, stop, wait_for

FRAME = 96 * 1024 * 1024


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes: a frame allocated
    and freed again between two samples of RSS would leave it raised."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def scrape(port: int, sample: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_every_socket_takes_its_limit_from_the_envelope() -> None:
    sock = socket(zmq.ROUTER, E.DEFAULT_MAX_BODY)
    try:
        assert sock.maxmsgsize == E.frame_limit(E.DEFAULT_MAX_BODY) > E.DEFAULT_MAX_BODY
        assert E.frame_limit(E.MAX_CONTROL_BODY) > E.MAX_HEADER
    finally:
        sock.close(0)


def test_an_oversized_frame_drops_its_sender_before_pilot_allocates_it(keydir) -> None:
    base = free_port_base()
    rpc_endpoint, metrics_port = f"tcp://127.0.0.1:{base + 12}", base + 19
    proc = subprocess.Popen([sys.executable, "-c", "from controlplane.pilot.cli import pilot_command; "
                             "pilot_command()", "--keys", str(keydir), "--port-base", str(base)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    legit = RpcClient(rpc_endpoint, Keyring(keydir, "proxy-a"), "pilot", timeout=1.0, retries=15)
    attacker = None
    try:
        workload = {"id": "a-1", "namespace": "default", "ip": "10.0.0.1", "labels": {"app": "a"}}
        assert legit.call("register", workload)["lease"] > 0
        disconnects = 'zmesh_bus_peer_disconnects_total{role="rpc-server"}'
        assert scrape(metrics_port, disconnects) == 0
        pilot = psutil.Process(proc.pid)
        rss, peak = pilot.memory_info().rss, peak_rss(proc.pid)

        attacker = raw_client(zmq.DEALER, keydir, "proxy-b", rpc_endpoint)
        attacker.send(b"x" * FRAME, copy=False)
        assert wait_for(lambda: scrape(metrics_port, disconnects) >= 1, timeout=30)

        grown = max(pilot.memory_info().rss - rss, peak_rss(proc.pid) - peak)
        print(f"pilot rss {rss >> 20} MiB, peak {peak >> 20} MiB, grew {grown >> 20} MiB")
        assert grown < FRAME // 4, f"pilot grew by {grown >> 20} MiB for a {FRAME >> 20} MiB frame"
        assert scrape(metrics_port, 'zmesh_bus_messages_rejected_total{reason="body_too_large"}') == 0
        # the legit peer, connected all along, is served as before
        assert legit.call("heartbeat", {"ids": ["a-1"]})["renewed"] == 1
        assert scrape(metrics_port, disconnects) == 1
    finally:
        if attacker is not None:
            attacker.close(0)
        legit.close()
        print(stop(proc))  # shown if the test fails
