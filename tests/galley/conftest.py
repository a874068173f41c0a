"""Galley's real peers: etcd (Debian's etcd-server) on loopback, and `meshctl galley` as a process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bus.loop import Loop
from controlplane.galley.etcd import EtcdClient
from tests.bus.helpers import subscriber
from tests.conftest import MESHCTL, free_port, wait_for


class Etcd:
    """One etcd member on loopback, with its data in a temp dir so it can be restarted."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [shutil.which("etcd") or "etcd", "--name", "test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = EtcdClient(self.endpoint, timeout=1)

        def up() -> bool:
            try:
                client.get_prefix("/")
                return True
            except Exception:
                return False

        assert wait_for(up, timeout=20, interval=0.1), "etcd did not start"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def etcd(tmp_path) -> Iterator[Etcd]:
    assert shutil.which("etcd"), "etcd-server is not installed (`make deps` installs it)"
    server = Etcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


class GalleyProcess:
    """`meshctl galley` as a real process watching `config`, with a bus subscriber to what it
    publishes (`sub.get(key)`) and its metrics endpoint."""

    def __init__(self, config: Path, keydir: Path, sub_loop: Loop) -> None:
        # below Linux's ephemeral ports; galley uses base+0, +1 and +9
        self.base = 21000 + os.getpid() % 1000 * 10
        self.proc = subprocess.Popen(
            [*MESHCTL, "galley", "--keys", str(keydir), "--name", "pilot", "--config-dir", str(config),
             "--port-base", str(self.base)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.sub = subscriber(sub_loop, keydir, None, prefix="galley/", server="pilot", silence_timeout=3,
                              pub_endpoint=f"tcp://127.0.0.1:{self.base}",
                              snapshot_endpoint=f"tcp://127.0.0.1:{self.base + 1}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.base + 9}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def peak_rss_kib(self) -> int:
        """The process's peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/pid/status")

    def stop(self) -> str:
        """SIGTERM, wait; galley's log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.fixture
def galley_process(keydir, loops, tmp_path) -> Iterator[Callable[[Path], GalleyProcess]]:
    started: list[GalleyProcess] = []

    def start(config: Path) -> GalleyProcess:
        started.append(GalleyProcess(config, keydir, loops("galley-watch")))
        return started[-1]

    yield start
    for g in started:
        g.stop()
