"""Pilot convergence: from a VirtualService edit in galley's source to every affected proxy ACKed.

Runs `meshctl galley` and `meshctl pilot` as processes, S services (a Kubernetes Service
and Deployment each) and P simulated proxies (real bus clients: register over CURVE RPC,
follow their group's config, ACK what they apply) spread over worker processes; proxies
are replicas of P/10 apps. Each worker process is a node: as the node agent does, one
relay there carries pilot's config to its proxies (`--direct`: every proxy subscribes to
pilot itself). Each edit changes the weights of one VirtualService; every proxy sees
every service, so every proxy must apply and ACK the new version. Pilot's debounce is
set with `--debounce-ms` (Istio's default, 100 ms, would be most of the budget alone).

Baseline in the same run: the raw bus fan-out with no galley, pilot or translation: one
zmesh Publisher in this process sends an update of the size an edit sends each proxy,
through the same relays, to as many subscribers in the same worker processes, timed the
same way (from the write to the last subscriber holding it).

Prints a table and one JSON line; `--quick` uses 100 proxies and 100 services.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bus import endpoints, keys  # noqa: E402
from bus.loop import Loop  # noqa: E402
from bus.rpc import RpcClient  # noqa: E402
from bus.service import signed_publisher  # noqa: E402
from controlplane.galley.source_dir import write_atomically  # noqa: E402

MESHCTL = str(Path(sys.executable).with_name("meshctl"))


def log(msg: str) -> None:
    print(f"[pilot_convergence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def services_yaml(n: int) -> str:
    docs = []
    for i in range(n):
        docs.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n"
                    f"  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 9080}}]\n")
        docs.append(f"apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: svc-{i}-v1}}\nspec:\n"
                    f"  selector: {{matchLabels: {{app: svc-{i}}}}}\n  template:\n"
                    f"    metadata: {{labels: {{app: svc-{i}, version: v1}}}}\n"
                    f"    spec: {{containers: [{{name: app, image: x}}]}}\n")
    return "---\n".join(docs)


def vs_yaml(weight: int) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: svc-0}\nspec:\n"
            "  hosts: [svc-0]\n  http:\n  - route:\n"
            f"    - destination: {{host: svc-0, subset: v1}}\n      weight: {weight}\n"
            f"    - destination: {{host: svc-0, subset: v2}}\n      weight: {100 - weight}\n")


DR = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc-0}\nspec:\n"
      "  host: svc-0\n  subsets:\n  - {name: v1, labels: {version: v1}}\n"
      "  - {name: v2, labels: {version: v2}}\n")


BASE_PREFIX = "base/"
JOINING = 4
BASE_PAD = 700  # bytes: about one virtual host and two manifests, what an edit sends a proxy


def _endpoints(base: int, component: str) -> tuple[str, str]:
    return (f"tcp://127.0.0.1:{base + endpoints.OFFSETS[(component, 'pub')]}",
            f"tcp://127.0.0.1:{base + endpoints.OFFSETS[(component, 'snapshot')]}")


def worker(index: int, count: int, apps: int, keydir: str, base: int, baseline_base: int, direct: bool,
           out: mp.Queue, stop: mp.Event) -> None:
    """One node: `count` simulated proxies and as many raw baseline subscribers; reports
    (id, version, monotonic time) for every config applied or baseline update held."""
    import resource

    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.pubsub import Subscriber
    from bus.relay import Relay
    from bus.signing import Verifier
    from tests.pilot.simproxy import SimProxy

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = Loop(f"w{index}").start()
    ring = Keyring(keydir, "bench")
    verifier = Verifier(ring.trusted_signers)
    run = tempfile.mkdtemp(prefix=f"zmesh-bench-node{index}-")

    def relay(component: str, prefix: str, server: str) -> tuple[str, str]:
        pub, snap = _endpoints(base if component == "pilot" else baseline_base, component)
        r = loop.call_sync(lambda: Relay(
            loop, upstream_pub=pub, upstream_snapshot=snap, server=server, prefix=prefix, keyring=ring,
            verifier=verifier, local_pub=f"ipc://{run}/{component}.pub",
            local_snapshot=f"ipc://{run}/{component}.snap", name=f"node{index}-{component}"))
        return r.local_pub, r.local_snapshot

    pilot_pub, pilot_snap = _endpoints(base, "pilot") if direct else relay("pilot", "cfg/", "pilot")
    base_pub, base_snap = _endpoints(baseline_base, "galley") if direct else relay("galley", BASE_PREFIX,
                                                                                    "bench")
    local_ring = ring if direct else None  # ipc:// on the node needs no CURVE: the socket is 0600
    proxies, subscribers = [], []
    for j in range(count):
        pid = f"w{index}-p{j}"
        app = (index * count + j) % apps

        def held(key: str, value: object, sid: str = f"b{index}-{j}") -> None:
            if isinstance(value, dict):
                out.put((sid, value["version"], time.monotonic()))

        subscribers.append(loop.call_sync(lambda held=held, j=j: Subscriber(
            loop, pub_endpoint=base_pub, snapshot_endpoint=base_snap, prefix=BASE_PREFIX, keyring=local_ring,
            server="bench", verifier=verifier, on_change=held, name=f"b{index}-{j}"), timeout=60))
        proxies.append(SimProxy(
            loop, ring, proxy_id=pid, namespace="default", ip=f"10.{index}.{j // 250}.{j % 250 + 1}",
            labels={"app": f"svc-{app}", "version": "v1"},
            pilot_rpc=f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'rpc')]}",
            pilot_pub=pilot_pub, pilot_snapshot=pilot_snap, via_relay=not direct, keep_config=False,
            verifier=verifier, follow=False,
            on_apply=lambda version, pid=pid: out.put((pid, version, time.monotonic()))))
        proxies[-1].heartbeat_every(5.0)
    # Register the whole node first, then follow, at most JOINING at a time. Following while
    # the fleet registers would make every proxy re-apply once per later registration (each
    # one changes an endpoint set every proxy sees): O(n^2) work for the harness, and 4000-part
    # snapshots in a burst would stall this node's loop past the lease. A real node has many
    # cores for this; the measurement is the edits afterwards.
    for j, p in enumerate(proxies):
        if j >= JOINING:
            deadline = time.monotonic() + 60
            while not proxies[j - JOINING].applied and time.monotonic() < deadline:
                time.sleep(0.005)
        p.follow()
    out.put(("ready", index, time.monotonic()))
    stop.wait()
    for p in proxies:
        p.close()
    loop.stop()
    shutil.rmtree(run, ignore_errors=True)


def converge(out: mp.Queue, acks: dict[str, dict[str, float]], edit: Callable[[], None], expect: int,
             prefix: str, timeout: float = 20.0) -> float | None:
    """Run `edit`, then wait until `expect` ids starting with `prefix` hold a version first seen
    after it (each config group has its own); returns the milliseconds from the edit to the last."""
    t0 = time.monotonic()
    edit()
    end = t0 + timeout
    while time.monotonic() < end:
        try:
            ident, version, t = out.get(timeout=0.05)
        except queue.Empty:
            continue
        acks.setdefault(version, {})[ident] = t
        held = {i: t for v, ids in acks.items() if ids and min(ids.values()) > t0  # versions new since t0
                for i, t in ids.items() if i.startswith(prefix)}
        if len(held) >= expect:
            return (max(held.values()) - t0) * 1000
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--proxies", type=int)
    parser.add_argument("--services", type=int)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--debounce-ms", type=float, default=10.0, help="pilot's quiet time")
    parser.add_argument("--direct", action="store_true", help="proxies subscribe to pilot, not a relay")
    parser.add_argument("--lease", type=float, default=60.0,
                        help="pilot's lease (s): the simulated fleet shares 2 cores, heartbeats run late")
    parser.add_argument("--logs", type=Path, help="keep galley's and pilot's logs in this directory")
    args = parser.parse_args()
    n_proxies = args.proxies or (100 if args.quick else 1000)
    n_services = args.services or (100 if args.quick else 1000)
    edits = min(args.edits, 10) if args.quick else args.edits
    apps = max(1, n_proxies // 10)
    work = Path(tempfile.mkdtemp(prefix="zmesh-bench-pilot-"))
    base = 25000 + os.getpid() % 400 * 10
    procs: list[subprocess.Popen] = []
    workers: list[mp.Process] = []
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    out: mp.Queue = ctx.Queue()
    baseline_base = base + 1000
    loop = Loop("bench").start()
    try:
        keydir = work / "keys"
        for name in ("galley", "pilot", "bench"):
            keys.generate(keydir, name)
        ring = keys.Keyring(keydir, "bench")
        baseline = loop.call_sync(lambda: signed_publisher(loop, "galley", ring, "127.0.0.1", baseline_base))
        baseline.set(BASE_PREFIX + "x", {"version": "start", "pad": ""})
        config = work / "config"
        config.mkdir()
        write_atomically(config / "services.yaml", services_yaml(n_services))
        write_atomically(config / "dr.yaml", DR)
        write_atomically(config / "vs.yaml", vs_yaml(90))
        env = {**os.environ, "ZMESH_PORT_BASE": str(base)}
        logdir = args.logs or work
        logdir.mkdir(parents=True, exist_ok=True)
        for name, extra in (("galley", ["--config-dir", str(config)]),
                            ("pilot", ["--debounce-after", str(args.debounce_ms / 1000),
                                       "--lease", str(args.lease)])):
            with open(logdir / f"{name}.log", "wb") as logfile:
                procs.append(subprocess.Popen([MESHCTL, name, "--keys", str(keydir), *extra], env=env,
                                              stdout=subprocess.DEVNULL, stderr=logfile))
        pilot_ps = psutil.Process(procs[1].pid)
        time.sleep(1.0)
        per = [n_proxies // args.workers + (1 if i < n_proxies % args.workers else 0)
               for i in range(args.workers)]
        for i, count in enumerate(per):
            w = ctx.Process(target=worker, daemon=True, args=(i, count, apps, str(keydir), base,
                                                              baseline_base, args.direct, out, stop))
            w.start()
            workers.append(w)
        acks: dict[str, dict[str, float]] = {}
        ready = 0
        deadline = time.monotonic() + 600
        while ready < len(workers):
            try:
                item = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"only {ready} of {len(workers)} workers started their proxies "
                                   "within 600 s") from None
            if item[0] == "ready":
                ready += 1
                log(f"worker {item[1]} ready ({ready}/{len(workers)})")
            else:
                acks.setdefault(item[1], {})[item[0]] = item[2]
        log(f"{n_proxies} proxies registered over {len(workers)} workers")
        client = RpcClient(f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'rpc')]}", ring, "pilot",
                           timeout=5)
        end = time.monotonic() + 120  # every proxy on pilot's current version before the first edit
        while time.monotonic() < end:
            status = client.call("status")
            if sum(r["state"] == "SYNCED" for r in status) >= n_proxies:
                break
            time.sleep(0.5)
        log(f"{sum(r['state'] == 'SYNCED' for r in status)} proxies SYNCED; editing")
        latencies, cpu_per_push = [], []
        for e in range(edits):
            cpu0 = pilot_ps.cpu_times()
            ms = converge(out, acks, lambda e=e: write_atomically(config / "vs.yaml", vs_yaml(10 + e % 80)),
                          n_proxies, "w")
            if ms is None:
                log(f"edit {e}: not every proxy applied it within 20 s")
                continue
            latencies.append(ms)
            cpu1 = pilot_ps.cpu_times()
            cpu_per_push.append((cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000)
            time.sleep(0.2)
        rss_mb = pilot_ps.memory_info().rss / 2**20
        status = client.call("status")
        client.close()
        synced = sum(1 for r in status if r["state"] == "SYNCED")
        raw = []
        for e in range(edits):
            ms = converge(out, acks, lambda e=e: baseline.set(BASE_PREFIX + "x", {"version": f"raw{e}",
                                                                                   "pad": "x" * BASE_PAD}),
                          n_proxies, "b")
            if ms is not None:
                raw.append(ms)
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        loop.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not latencies or not raw:
        print(json.dumps({"benchmark": "pilot_convergence", "error": "no edit converged"}))
        return
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    r50, r99 = percentile(raw, 0.5), percentile(raw, 0.99)
    cpu = statistics.median(cpu_per_push)
    print(f"{n_proxies} proxies, {n_services} services, {args.workers} nodes"
          f"{' (direct)' if args.direct else ' (relay per node)'}, debounce {args.debounce_ms:g} ms")
    print(f"{'path':<28} {'edits':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 / raw':>9}")
    print(f"{'raw bus fan-out (baseline)':<28} {len(raw):>5} {r50:>8.1f} {r99:>8.1f} {max(raw):>8.1f} "
          f"{1:>9.2f}")
    print(f"{'galley+pilot edit -> apply':<28} {len(latencies):>5} {p50:>8.1f} {p99:>8.1f} "
          f"{max(latencies):>8.1f} {p99 / r99:>9.2f}")
    print(f"pilot: {cpu:.1f} ms CPU per push (median), RSS {rss_mb:.1f} MB, {synced}/{n_proxies} SYNCED")
    print(json.dumps({"benchmark": "pilot_convergence", "proxies": n_proxies, "services": n_services,
                      "nodes": args.workers, "direct": args.direct, "debounce_ms": args.debounce_ms,
                      "edits": len(latencies), "p50_ms": p50, "p99_ms": p99, "max_ms": max(latencies),
                      "raw_p50_ms": r50, "raw_p99_ms": r99, "p99_ratio_to_raw": p99 / r99,
                      "pilot_cpu_ms_per_push": cpu, "pilot_rss_mb": rss_mb, "synced": synced,
                      "goal": {"p99_ms_max": 100, "rss_mb_max": 300, "met": p99 <= 100 and rss_mb <= 300}}))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        log(f"failed: {exc}")
        print(json.dumps({"benchmark": "pilot_convergence", "error": str(exc)}))
        sys.exit(1)
