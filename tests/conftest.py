"""Shared fixtures: a mesh key directory, running loops, and bounded waiting."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from prometheus_client import REGISTRY

from bus import keys, logs
from bus.loop import Loop

NAMES = ("pilot", "galley", "nodeagent", "proxy-a", "proxy-b", "citadel", "meshctl")
ROOT = Path(__file__).resolve().parents[1]
# `meshctl` from this checkout (PYTHONPATH reaches it), whatever an installed script points at
MESHCTL = [sys.executable, "-m", "meshctl"]
# shared/ sits beside the checkout (for developers and CI alike)
ISTIO_TESTDATA = ROOT.parent / "shared" / "testdata" / "istio"

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
logs.configure("INFO")


def unavailable(reason: str) -> NoReturn:
    """What a test needs (root, a namespace, a kernel feature, a package) is missing: skipped on a
    developer's machine, a failure in CI (CI=true), where `make test` installs all of it first
    (`make deps`)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `cond` until truthy or `timeout`; returns the final truth value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


# Ports for servers the tests start, below the kernel's ephemeral range; see free_port.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIXED_WINDOW = 8192
_cursor: tuple[int, Iterator[int]] | None = None  # (pid, this process's walk through the window)


def _bindable(port: int, reuse: bool) -> bool:
    """Whether a bind to `port` on every address succeeds now (`reuse`: as a server's would, past
    TIME_WAIT leftovers; without it, any socket on the port counts)."""
    with socket.socket() as s:
        if reuse:  # what zmq, etcd and http.server set on their listeners
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port nobody is bound to, from just below net.ipv4.ip_local_port_range.

    A server a test restarts binds the same port again, and a port from the ephemeral range may be
    taken in between by any outgoing connection's source port (a client reconnecting to that very
    port can even connect to itself). Below the range the kernel never picks ports, so only an
    explicit bind can take one. Each process walks the window from its own pid-derived offset, so
    parallel test runs on one machine rarely try the same port, and a port found bound is skipped.
    """
    global _cursor
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    window = range(max(1024, low - FIXED_WINDOW), low)
    if not window:  # the ephemeral range starts at 1024: nothing below it to use
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _cursor is None or _cursor[0] != os.getpid():  # a forked child starts its own walk
        _cursor = (os.getpid(), itertools.count(os.getpid() * 2654435761))
    for _ in range(len(window)):
        port = window[next(_cursor[1]) % len(window)]
        if _bindable(port, reuse=False):
            return port
    raise RuntimeError(f"no free port in {window}")


def wait_released(*endpoints: str | int, timeout: float = 10.0) -> None:
    """Wait until no listener holds these ports (ints or "tcp://host:port"), so a server restarted in
    this process can bind them again. Loop.stop() returning is not enough: libzmq closes a socket's
    listening fd in its own I/O thread some time after close() (linger 0 only drops queued
    messages), and until then a new bind fails with "Address already in use"."""
    ports = [e if isinstance(e, int) else int(e.rsplit(":", 1)[1]) for e in endpoints]
    assert wait_for(lambda: all(_bindable(p, reuse=True) for p in ports), timeout), \
        f"ports {ports} still bound after {timeout}s"


def free_port_base(span: int = 60, attempts: int = 50) -> int:
    """A control-plane port base (bus.endpoints) whose `span` ports nobody listens on right now,
    below Linux's ephemeral range so that no outgoing connection takes one meanwhile."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(10000, 32000 - span, 10)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + span):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free run of {span} ports found")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """SIGTERM `proc` (SIGKILL if it does not exit within `timeout`); returns its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=timeout)
    return err or ""


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="session")
def istio_testdata() -> Path:
    """Istio's bookinfo samples and validation dataset (Apache-2.0), from ../shared."""
    assert ISTIO_TESTDATA.is_dir(), f"{ISTIO_TESTDATA} is missing: shared/ must sit beside the checkout"
    return ISTIO_TESTDATA


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mesh-keys")
    for name in NAMES:
        keys.generate(d, name)
    return d


@pytest.fixture(scope="session")
def outsider_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys that are NOT in the mesh keyring (an intruder, an impostor 'pilot')."""
    d = tmp_path_factory.mktemp("outsider-keys")
    for name in ("intruder", "pilot"):
        keys.generate(d, name)
    return d


@pytest.fixture
def loops() -> Iterator[Callable[[str], Loop]]:
    """Start as many loops as a test wants; all are stopped afterwards."""
    started: list[Loop] = []

    def make(name: str = "test") -> Loop:
        loop = Loop(name).start()
        started.append(loop)
        return loop

    yield make
    for loop in started:
        loop.stop()
