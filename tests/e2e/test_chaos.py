"""Chaos under load: control-plane components and sidecars killed while bookinfo serves traffic.

A `Load` runs a few client threads from the sleep pod's network: sleep -> productpage -> details
and reviews (-> ratings), every hop through the sidecars, recording each request's start, end and
outcome. A request succeeds only when every hop answered (productpage embeds its backends'
errors in a 200, so the page is checked, not just its status).

- The data plane does not need the control plane: with pilot, galley or citadel killed no request
  fails, and once it is back the proxies re-sync and a route change reaches the traffic.
- A proxy worker killed: the supervisor stops (dataplane/proxy/main.py: a dead worker stops the
  proxy) and the agent restarts the whole proxy, so the pod's traffic fails while it is down.
  Failures are allowed only for requests that overlapped that gap; every request started after the
  pod is ready again succeeds.
- A hand-over (SIGHUP to the agent) loses nothing.

Two of these found bugs, since fixed: a pilot restart left the proxies STALE until the next config
change (the proxy now repeats its answer after a re-sync), and a hand-over lost the connections that
reached the new proxy before it had a config (transparent listeners now open with the first config).

The module has its own mesh (the `mesh` fixture is module-scoped), so test_bookinfo's is untouched.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import pytest

from meshctl.localmesh import netns
from meshctl.localmesh.mesh import Mesh, MeshError
from tests.e2e.conftest import metric, running_mesh, scrape

THREADS = 3
REQUEST_TIMEOUT = 5.0
PACE = 0.02          # seconds a client thread rests between requests (the machine is shared)
LOAD_LIMIT = 60.0    # a load never runs longer than this, whatever happens to the test
DOWN_FOR = 3.5       # seconds a control-plane component stays dead: past the bus's 3 s silence
DOWN_REQUESTS = 20   # ... and at least this many requests must have been answered meanwhile
SYNC_TIMEOUT = 30.0


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    ok: bool
    reviews: str   # the reviews version that answered productpage, or "-"
    detail: str


def page_problem(status: int, body: bytes) -> str | None:
    """None for a complete product page, else what is wrong with it."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    try:
        page = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    details, reviews = page.get("details", {}), page.get("reviews", {})
    if details.get("service") != "details" or "error" in details:
        return f"details: {details}"
    if reviews.get("service") != "reviews" or "error" in reviews:
        return f"reviews: {reviews}"
    ratings = reviews.get("ratings")
    if reviews.get("version") in ("v2", "v3") and (not isinstance(ratings, dict) or "error" in ratings):
        return f"ratings: {ratings}"
    return None


class Load:
    """Client threads in the sleep pod asking for the product page until stopped (or LOAD_LIMIT)."""

    def __init__(self, mesh: Mesh, threads: int = THREADS) -> None:
        self.mesh = mesh
        self.vip = mesh.layout.vips["productpage"]
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not stop"

    def _client(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            reviews = "-"
            try:
                status, body = self.mesh.http("sleep", self.vip, 9080, "/productpage",
                                              {"Host": "productpage:9080"}, timeout=REQUEST_TIMEOUT)
                problem = page_problem(status, body)
                if problem is None:
                    reviews = json.loads(body)["reviews"]["version"]
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut mid-answer, timed out
                problem = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), problem is None, reviews,
                                             problem or ""))
            self._stop.wait(PACE)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def started_after(self, t: float) -> list[Outcome]:
        return [o for o in self.snapshot() if o.started >= t]

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = SYNC_TIMEOUT) -> None:
        """Poll `done` (a condition on the outcomes or the mesh) until true; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} after {timeout:g}s; failures so far: {self.failures()[:5]}")
            if not any(t.is_alive() for t in self._threads):
                pytest.fail(f"the load stopped before {what}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """This module's own mesh (overrides conftest's, so test_bookinfo's mesh is never disturbed)."""
    with running_mesh("zmesh-chaos-") as m:
        yield m


def route_reviews_to(subset: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: {subset}
"""


def proxy_status(mesh: Mesh) -> list[dict[str, str]]:
    try:
        return mesh.proxy_status()
    except (netns.NetnsError, subprocess.TimeoutExpired, ValueError):
        return []  # pilot not answering yet


def known_to_pilot(mesh: Mesh) -> bool:
    """Every pod registered (again): `Mesh.apply` compares against the proxies pilot knows."""
    return {r["proxy"] for r in proxy_status(mesh)} == {p.name for p in mesh.layout.pods}


def all_synced(mesh: Mesh) -> bool:
    rows = proxy_status(mesh)
    return len(rows) == len(mesh.layout.pods) and all(r["state"] == "SYNCED" for r in rows)


def test_chaos_helpers_refuse_what_is_not_there(mesh: Mesh) -> None:
    with pytest.raises(MeshError, match="no running process 'nosuch'"):
        mesh.pid_of("nosuch")
    with pytest.raises(MeshError, match="never started or still runs"):
        mesh.restart_component("pilot", ["true"])  # pilot runs: restarting it would start a second one
    assert psutil.Process(mesh.pid_of("pilot")).is_running()


def kill_under_load(mesh: Mesh, load: Load, component: str) -> list[str]:
    """Kill -9 `component`, keep it down DOWN_FOR seconds and DOWN_REQUESTS requests, start it again the
    way bring-up did; returns the failures seen while it was down."""
    command = mesh.kill_component(component, signal.SIGKILL)
    killed = time.monotonic()
    load.wait_for(f"{DOWN_REQUESTS} requests answered with {component} down",
                  lambda: len(load.started_after(killed)) >= DOWN_REQUESTS
                  and time.monotonic() - killed >= DOWN_FOR)
    down_failures = load.failures()
    mesh.restart_component(component, command)
    return down_failures


@pytest.mark.parametrize("component, subset", [("pilot", "v1"), ("galley", "v2"), ("citadel", "v3")])
def test_control_plane_killed_traffic_flows_and_a_later_route_change_arrives(mesh: Mesh, component: str,
                                                                             subset: str) -> None:
    with Load(mesh) as load:
        load.wait_for("serving", lambda: len(load.snapshot()) >= THREADS)
        down_failures = kill_under_load(mesh, load, component)
        load.wait_for("pilot to know every proxy again", lambda: known_to_pilot(mesh))
        # returns once every proxy is SYNCED at a version it had not ACKed before
        mesh.apply("vs-reviews.yaml", route_reviews_to(subset), timeout=SYNC_TIMEOUT)
        applied = time.monotonic()
        load.wait_for("10 requests after the route change", lambda: len(load.started_after(applied)) >= 10)
    assert down_failures == [], f"requests failed while {component} was down: {down_failures[:5]}"
    assert load.failures() == [], f"requests failed after {component} came back: {load.failures()[:5]}"
    after = {o.reviews for o in load.started_after(applied)}
    assert after == {subset}, f"the route to reviews {subset} did not reach the traffic: {after}"


def test_pilot_killed_proxies_resync_without_a_config_change(mesh: Mesh) -> None:
    """(galley's and citadel's restarts leave pilot's ACK records alone: the test above covers them.)"""
    before = mesh.versions()
    with Load(mesh) as load:
        load.wait_for("serving", lambda: len(load.snapshot()) >= THREADS)
        down_failures = kill_under_load(mesh, load, "pilot")
        load.wait_for("every proxy SYNCED again", lambda: all_synced(mesh), timeout=10.0)
    assert down_failures == [] and load.failures() == [], load.failures()[:5]
    assert mesh.versions() == before  # nothing changed, so nothing new was pushed


def proxy_processes(mesh: Mesh, pod: str) -> tuple[psutil.Process, list[psutil.Process]]:
    """The pod's proxy supervisor (the agent's proxy child) and its workers."""
    agent = psutil.Process(mesh.pid_of(f"{mesh.pod(pod).name}.sidecar"))
    proxies = [p for p in agent.children() if "proxy" in p.cmdline()]
    assert len(proxies) == 1, f"expected one proxy under the agent, found {proxies}"
    return proxies[0], proxies[0].children()


def pod_ready(mesh: Mesh, pod: str) -> bool:
    try:
        return mesh.http(pod, "127.0.0.1", 15021, "/healthz/ready", timeout=1.0)[0] == 200
    except OSError:
        return False


def agent_metric(mesh: Mesh, pod: str, name: str, **labels: str) -> float:
    """A sample of the agent's merged exposition (15020); without labels, the unlabeled sample."""
    text = scrape(mesh, pod, 15020, "/stats/prometheus")
    if labels:
        return metric(text, name, **labels)
    values = [float(line.split()[1]) for line in text.splitlines() if line.split(" ", 1)[0] == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def test_proxy_worker_killed_agent_restarts_the_proxy_and_traffic_recovers(mesh: Mesh) -> None:
    supervisor, workers = proxy_processes(mesh, "productpage")
    assert len(workers) == mesh.workers, workers
    restarts = agent_metric(mesh, "productpage", "zmesh_agent_proxy_restarts_total")
    with Load(mesh) as load:
        load.wait_for("serving", lambda: len(load.snapshot()) >= THREADS)
        killed = time.monotonic()
        os.kill(workers[0].pid, signal.SIGKILL)
        # the supervisor stops on a dead worker and the agent starts a new proxy: wait for that one
        load.wait_for("a new proxy", lambda: not supervisor.is_running())
        load.wait_for("productpage ready again", lambda: pod_ready(mesh, "productpage"))
        ready = time.monotonic()
        load.wait_for("20 requests after the restart", lambda: len(load.started_after(ready)) >= 20)
    outcomes = load.snapshot()
    gap = [o for o in outcomes if o.started < ready and o.ended > killed]
    failed = [o for o in outcomes if not o.ok]
    print(f"\nworker kill: {len(failed)} of {len(gap)} requests in the {ready - killed:.2f}s gap failed "
          f"({len(outcomes)} requests in all)")
    assert [o for o in failed if o not in gap] == [], "a request outside the gap failed"
    assert all(o.ok for o in load.started_after(ready)), "a request after the restart failed"
    # one worker: its death takes the pod's listeners down, so requests in the gap cannot all succeed
    assert failed, f"no request failed in the {ready - killed:.2f}s gap: did the kill hit the traffic?"
    new_supervisor, new_workers = proxy_processes(mesh, "productpage")
    assert new_supervisor.pid != supervisor.pid and len(new_workers) == mesh.workers
    assert agent_metric(mesh, "productpage", "zmesh_agent_proxy_restarts_total") == restarts + 1


def test_rolling_proxy_restart_loses_no_request(mesh: Mesh) -> None:
    """productpage's sidecar carries inbound (from sleep) and outbound (to details, reviews) traffic."""
    pod = "productpage"
    supervisor, _ = proxy_processes(mesh, pod)
    done = agent_metric(mesh, pod, "zmesh_agent_proxy_handovers_total", result="done")
    with Load(mesh) as load:
        load.wait_for("serving", lambda: len(load.snapshot()) >= THREADS)
        os.kill(mesh.pid_of(f"{mesh.pod(pod).name}.sidecar"), signal.SIGHUP)
        load.wait_for("the old proxy drained and stopped", lambda: not supervisor.is_running())
        stopped = time.monotonic()
        load.wait_for("20 requests after the hand-over", lambda: len(load.started_after(stopped)) >= 20)
    # every destination is a declared service: a configured proxy never passes one through
    passthrough = agent_metric(mesh, pod, "istio_tcp_connections_opened_total", reporter="source",
                               destination_service_name="PassthroughCluster")
    assert load.failures() == [], (f"{len(load.failures())} requests failed ({passthrough:g} connections "
                                   f"passed through by the new proxy): {load.failures()[:5]}")
    assert passthrough == 0
    assert proxy_processes(mesh, pod)[0].pid != supervisor.pid
    assert agent_metric(mesh, pod, "zmesh_agent_proxy_handovers_total", result="done") == done + 1
