"""Real processes: a publisher killed with -9 and restarted, a subscriber restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus.helpers import subscriber
from tests.conftest import MESHCTL, free_port, metric, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def send(self, line: str) -> None:
        n = self.lines.count("ok")
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        assert wait_for(lambda: self.lines.count("ok") > n, timeout=5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)
        self.p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def start_publisher(procs, keydir, pub_ep, snap_ep, *items) -> Proc:
    proc = Proc([sys.executable, "-m", "tests.bus.peer", "--keys", str(keydir), "--pub", pub_ep,
                 "--snapshot", snap_ep, *items])
    procs.append(proc)
    assert wait_for(lambda: "ready" in proc.lines, timeout=10)
    return proc


def test_publisher_killed_with_sigkill_and_restarted(keydir, loops, procs) -> None:
    pub_ep, snap_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    first = start_publisher(procs, keydir, pub_ep, snap_ep, "cfg/a=1", "cfg/b=1")
    sub = subscriber(loops("sub"), keydir, None, pub_endpoint=pub_ep, snapshot_endpoint=snap_ep)
    assert sub.wait_ready(10)
    assert sub.items() == {"cfg/a": "1", "cfg/b": "1"}
    epoch = sub.machine.epoch
    silences = metric("zmesh_bus_resnapshots_total", cause="silence")
    first.kill(signal.SIGKILL)
    assert wait_for(lambda: metric("zmesh_bus_resnapshots_total", cause="silence") > silences, timeout=5)
    assert sub.items() == {"cfg/a": "1", "cfg/b": "1"}  # the last state is still served

    start_publisher(procs, keydir, pub_ep, snap_ep, "cfg/a=2", "cfg/c=2")
    assert wait_for(lambda: sub.items() == {"cfg/a": "2", "cfg/c": "2"}, timeout=10), sub.items()
    assert sub.machine.epoch != epoch


def test_subscriber_process_restarted_gets_everything_it_missed(keydir, procs) -> None:
    pub_ep, snap_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    pub = start_publisher(procs, keydir, pub_ep, snap_ep, "cfg/a=1")

    def watcher() -> Proc:
        proc = Proc([*MESHCTL, "bus", "watch", "--keys", str(keydir), "--as", "proxy-a",
                     "--server", "pilot", "--pub", pub_ep, "--snapshot", snap_ep, "cfg/"])
        procs.append(proc)
        return proc

    def state(proc: Proc) -> dict:
        out: dict = {}
        for line in list(proc.lines):
            change = json.loads(line)
            if change["deleted"]:
                out.pop(change["key"], None)
            else:
                out[change["key"]] = change["value"]
        return out

    first = watcher()
    assert wait_for(lambda: state(first) == {"cfg/a": "1"}, timeout=10)
    pub.send("set cfg/b 2")
    assert wait_for(lambda: state(first) == {"cfg/a": "1", "cfg/b": "2"}, timeout=10)
    first.kill(signal.SIGKILL)
    pub.send("set cfg/c 3")
    pub.send("del cfg/a")
    second = watcher()
    assert wait_for(lambda: state(second) == {"cfg/b": "2", "cfg/c": "3"}, timeout=10), second.lines
