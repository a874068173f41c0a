"""A real etcd (Debian's etcd-server) on loopback, for galley's etcd source."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.galley.etcd import EtcdClient
from tests.conftest import free_port, wait_for


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
