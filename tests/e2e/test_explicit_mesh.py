"""The mesh without root: `meshctl up --explicit` (what runs for a non-root user), explicit-mode sidecars on
loopback addresses, the same bookinfo demo. Real processes and sockets; requests go where an app's
would (its sidecar's outbound address, the service in the Host header), and the sidecars' own metrics
say they carried them. Teardown must leave no process carrying the run's marker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy.worker import app_on
from meshctl.localmesh import loopback, netns
from meshctl.localmesh.loopback import LoopbackMesh
from meshctl.localmesh.mesh import BOOKINFO, MeshError
from tests.e2e.conftest import metric

STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def _gone(mesh: LoopbackMesh, pids: list[int]) -> list[str]:
    """What of `mesh` still runs: recorded PIDs alive, or any process carrying its marker."""
    left = [f"pid {pid}" for pid in pids if netns.alive(pid)]
    return left + [f"marked pid {pid}" for pid, _ in loopback.marked(mesh.run_id)]


@pytest.fixture(scope="module")
def lmesh() -> Iterator[LoopbackMesh]:
    run_dir = Path(tempfile.mkdtemp(prefix="zmesh-explicit-"))
    m = LoopbackMesh(run_dir / "run", say=lambda _msg: None)
    pids: list[int] = []
    try:
        try:
            m.up(timeout=60)
        except MeshError as exc:
            logs = "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-600:]}"
                             for p in sorted(m.logs.glob("*.log")))
            pytest.fail(f"the explicit mesh did not come up: {exc}\n{logs}")
        pids = [p.pid for p in m.state.procs]
        yield m
    finally:
        m.down()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not _gone(m, pids), f"teardown left processes behind: {_gone(m, pids)}"


def as_sleep(mesh: LoopbackMesh, service: str, path: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET <service>:9080<path> the way the sleep pod's app would: to its sidecar, naming the service."""
    out = mesh.outbound_host(mesh.pod("sleep"))
    status, body = mesh.http(None, out, 9080, path, {"Host": f"{service}:9080", **(headers or {})})
    return status, json.loads(body)


def proxy_metrics(mesh: LoopbackMesh, pod: str) -> str:
    status, body = mesh.http(None, "127.0.0.1", mesh.ports(mesh.pod(pod)).stats, "/stats/prometheus")
    assert status == 200, body
    return body.decode()


def test_productpage_calls_details_reviews_and_ratings_through_the_sidecars(lmesh: LoopbackMesh) -> None:
    seen: Counter[str] = Counter()
    for _ in range(12):
        status, page = as_sleep(lmesh, "productpage", "/productpage")
        assert status == 200 and page["details"]["service"] == "details", page
        reviews = page["reviews"]
        seen[reviews["version"]] += 1
        if reviews["version"] in ("v2", "v3"):
            assert reviews["ratings"]["service"] == "ratings", reviews
    assert set(seen) == {"v1", "v2", "v3"}, seen  # destination-rule-all's subsets, no route: all three
    page = proxy_metrics(lmesh, "productpage")
    for service in ("details", "reviews"):
        assert metric(page, "istio_requests_total", reporter="source", destination_service_name=service,
                      response_code="200") >= 1, service
    rating_calls = sum(metric(proxy_metrics(lmesh, pod), "istio_requests_total", reporter="source",
                              destination_service_name="ratings") for pod in ("reviews-v2", "reviews-v3"))
    assert rating_calls >= 1
    assert metric(proxy_metrics(lmesh, "ratings"), "istio_requests_total", reporter="destination",
                  destination_app="ratings", response_code="200") >= 1


def reviews_version(mesh: LoopbackMesh, headers: dict[str, str]) -> str:
    status, page = as_sleep(mesh, "productpage", "/productpage", headers)
    assert status == 200, page
    return page["reviews"]["version"]


def test_a_virtual_service_routes_jason_to_reviews_v2(lmesh: LoopbackMesh) -> None:
    lmesh.apply("vs-reviews.yaml", (BOOKINFO / "virtual-service-reviews-test-v2.yaml").read_text())
    try:
        jason = {reviews_version(lmesh, {"end-user": "jason"}) for _ in range(6)}
        others = {reviews_version(lmesh, {}) for _ in range(6)}
    finally:
        lmesh.apply("vs-reviews.yaml", None)
    assert (jason, others) == ({"v2"}, {"v1"})


def test_strict_mtls_between_sidecars_and_plaintext_refused(lmesh: LoopbackMesh) -> None:
    page_ip = lmesh.pod("productpage").ip
    # Up means every sidecar's /ready said yes, which includes its workers holding the certificates:
    # productpage's calls to details are mutual TLS from the first one. (Before, a worker could pick
    # them up a tick after the agent said ready; its plain-text keep-alive connection to details then
    # outlived STRICT and carried the call below, so no mutual_tls request was ever counted.)
    assert lmesh.http(None, page_ip, 9080, "/productpage")[0] == 200  # PERMISSIVE: plain text is taken
    lmesh.apply("peer-authentication-strict.yaml", STRICT)
    try:
        with pytest.raises(OSError):  # no client certificate: the inbound listener closes the connection
            lmesh.http(None, page_ip, 9080, "/productpage", timeout=5)
        status, page = as_sleep(lmesh, "productpage", "/productpage")
        assert status == 200 and page["details"]["service"] == "details", page
    finally:
        lmesh.apply("peer-authentication-strict.yaml", None)
    assert metric(proxy_metrics(lmesh, "details"), "istio_requests_total", reporter="destination",
                  destination_app="details", source_principal="spiffe://cluster.local/ns/default/sa/"
                  "bookinfo-productpage", connection_security_policy="mutual_tls") >= 1


def test_app_on_moves_only_the_inbound_clusters_endpoints() -> None:
    config = {"clusters": {"inbound|9080||": {"direction": "inbound"},
                           "outbound|9080||x": {"direction": "outbound"}},
              "endpoints": {"inbound|9080||": [{"address": "127.0.0.1", "port": 9080}],
                            "outbound|9080||x": [{"address": "127.0.0.1", "port": 9080}]}}
    moved = app_on(config, "127.9.3.1")
    assert moved["endpoints"] == {"inbound|9080||": [{"address": "127.9.3.1", "port": 9080}],
                                  "outbound|9080||x": [{"address": "127.0.0.1", "port": 9080}]}
    assert config["endpoints"]["inbound|9080||"][0]["address"] == "127.0.0.1"  # the input is not changed


def test_a_run_directory_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    mesh = LoopbackMesh(tmp_path, say=lambda _msg: None)
    try:
        with pytest.raises(MeshError, match="not a run directory of ours"):
            mesh.up(timeout=5)
    finally:
        mesh.down()
    assert (tmp_path / "precious.txt").read_text() == "keep me" and not mesh.state.procs


def test_sweep_stops_what_a_crashed_run_left_and_only_that() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed, live = f"{netns.PREFIX}{dead.pid}", f"{netns.PREFIX}{os.getpid()}"
    procs = {run: subprocess.Popen(["sleep", "60"], env={**os.environ, loopback.RUN_ENV: run})
             for run in (crashed, live)}
    try:
        assert {p.pid for p in procs.values()} <= {pid for pid, _ in loopback.marked()}
        assert procs[crashed].pid in loopback.sweep_stale()
        assert procs[crashed].wait(5) is not None
        assert procs[live].poll() is None  # its run (this process) is alive
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_meshctl_up_explicit_and_down_leave_nothing(tmp_path: Path) -> None:
    """The CLI end to end: up prints what to try (the first curl works), `down` stops it and everything."""
    run_dir = tmp_path / "run"
    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--explicit", "--run-dir",
                           str(run_dir), "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    run_id = f"{netns.PREFIX}{up.pid}"
    try:
        state = run_dir / "state.json"
        for _ in range(900):  # bounded: 90 s
            if any("Stop: Ctrl-C" in line for line in lines) or up.poll() is not None:
                break
            threading.Event().wait(0.1)
        text = "".join(lines)
        assert "Stop: Ctrl-C" in text, text
        url = re.search(r"curl -s (http://127\.\d+\.1\.\d+:9080/productpage)", text)
        assert url, text
        done = subprocess.run(["curl", "-s", "--max-time", "10", url.group(1)], capture_output=True,
                              text=True, timeout=20)
        assert json.loads(done.stdout)["details"]["service"] == "details", done.stdout
        pids = [p.pid for p in netns.State.load(state).procs]
        down = subprocess.run([sys.executable, "-m", "meshctl", "down", "--run-dir",
                               str(run_dir)], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "removed the mesh" in down.stdout, down.stdout + down.stderr
        assert up.wait(30) == 0
        reader.join(5)
        assert "no process of it is left" in "".join(lines)
        assert not [p for p in pids if netns.alive(p)] and not loopback.marked(run_id)
        assert not state.exists()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, 9)
            up.wait()
        loopback.sweep(run_id)
