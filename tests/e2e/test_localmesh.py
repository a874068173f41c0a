"""The pieces under the e2e mesh: namespace teardown and the crashed-run sweep (real namespaces and
processes), the bookinfo app's behaviour (sans-IO), and bad input: an unknown service, a run
directory that is not ours, `meshctl down` with nothing to remove."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.localmesh import netns
from meshctl.localmesh.bookinfo import App
from meshctl.localmesh.mesh import Mesh, MeshError
from tests.conftest import ROOT, unavailable, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and not stat.read_text().split(") ")[1].startswith("Z")


@pytest.fixture
def root() -> None:
    if reason := netns.missing_tools():
        unavailable(reason)


def test_teardown_removes_exactly_what_the_state_records(root: None, tmp_path: Path) -> None:
    state = netns.State(str(tmp_path / "state.json"))
    topo = netns.Topology(state, f"{netns.PREFIX}{os.getpid()}-t")
    try:
        topo.make_bridge("10.250.0.1/24")
        pod = topo.add_ns("pod", "10.96.0.10 reviews\n")
        topo.attach(pod, "10.250.0.10/24", "10.250.0.1")
        proc = topo.start("sleeper", pod, ["sleep", "60"], tmp_path)
        assert "10.96.0.10 reviews" in (netns.ETC_NETNS / pod / "hosts").read_text()
        # the pod reaches the bridge namespace over its veth: refused (an answer), not a timeout
        with pytest.raises(ConnectionRefusedError):
            netns.connect(pod, "10.250.0.1", 9, timeout=3).close()
        recorded = netns.State.load(state.path)
        assert recorded.namespaces == [topo.bridge, pod] and recorded.procs[0].pid == proc.pid
    finally:
        netns.teardown(state, grace=1.0)
    proc.wait(5)
    assert not any((netns.NETNS_DIR / ns).exists() for ns in (topo.bridge, pod))
    assert not (netns.ETC_NETNS / pod).exists() and not Path(state.path).exists()


def test_sweep_removes_namespaces_and_processes_of_a_crashed_run_only(root: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{netns.PREFIX}{dead.pid}-x", f"{netns.PREFIX}{os.getpid()}-live"
    orphan = None
    try:
        for ns in (stale, live):
            netns.run("ip", "netns", "add", ns)
        orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"], start_new_session=True)
        assert wait_for(lambda: orphan.pid in netns.ns_pids(stale), 5)
        assert stale in netns.sweep_stale()
        assert not (netns.NETNS_DIR / stale).exists()
        assert (netns.NETNS_DIR / live).exists()  # its run (this process) is alive
        assert wait_for(lambda: orphan.poll() is not None, 5)
    finally:
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
        for ns in (stale, live):
            netns.remove_namespace(ns)


def test_bookinfo_answers_name_their_version_and_fail_once_fails_once() -> None:
    reviews = App("reviews", "v1")
    assert reviews.handle("/reviews/7", {"end-user": "jason"}) == (200, {
        "service": "reviews", "version": "v1", "id": "7", "end-user": "jason",
        "reviews": ["An extremely entertaining play by Shakespeare.", "Absolutely fun and entertaining."]})
    assert reviews.handle("/nope", {})[0] == 404
    details = App("details", "v1")
    assert details.handle("/details/0", {"x-fail-once": "a"})[0] == 500
    assert details.handle("/details/0", {"x-fail-once": "a"})[0] == 200
    assert details.handle("/details/0", {"x-fail-once": "b"})[0] == 500
    with pytest.raises(ValueError, match="unknown service 'carts'"):
        App("carts", "v1")


def test_bookinfo_cli_refuses_an_unknown_service() -> None:
    done = subprocess.run([sys.executable, "-m", "meshctl.localmesh.bookinfo", "carts", "v1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2 and "carts" in done.stderr


def test_down_with_nothing_up_says_so(root: None, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "meshctl", "down", "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "nothing to remove" in done.stdout, done.stderr


def test_up_refuses_to_wipe_a_directory_it_did_not_make(root: None, tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep me")
    mesh = Mesh(tmp_path, say=lambda _msg: None)
    with pytest.raises(MeshError, match="not a run directory of ours"):
        mesh.up()
    assert (tmp_path / "precious").read_text() == "keep me" and mesh.state.namespaces == []
