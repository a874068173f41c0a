"""Pilot convergence: from a VirtualService edit in galley's source to every affected proxy ACKed.

Runs `meshctl galley` and `meshctl pilot` as processes, S services (a Kubernetes Service
and Deployment each) and P simulated proxies (real bus clients: register over CURVE RPC,
follow their group's key, ACK what they apply) spread over worker processes; proxies are
replicas of P/10 apps. Each edit changes the weights of one VirtualService; every proxy
sees every service, so every proxy must ACK the new version.

Baseline in the same run: the raw bus fan-out of the same number of config-sized updates
with no translation (one zmesh Publisher, the same subscribers' processes).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bus import endpoints, keys  # noqa: E402
from bus.rpc import RpcClient  # noqa: E402
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


def worker(index: int, count: int, apps: int, keydir: str, base: int, out: mp.Queue,
           stop: mp.Event) -> None:
    """Runs `count` simulated proxies; reports (proxy, version, monotonic time) for every ACK."""
    import resource

    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.signing import Verifier
    from tests.pilot.simproxy import SimProxy

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = Loop(f"w{index}").start()
    ring = Keyring(keydir, "bench")
    verifier = Verifier(ring.trusted_signers)
    proxies = []

    for j in range(count):
        pid = f"w{index}-p{j}"
        app = (index * count + j) % apps
        proxies.append(SimProxy(
            loop, ring, proxy_id=pid, namespace="default", ip=f"10.{index}.{j // 250}.{j % 250 + 1}",
            labels={"app": f"svc-{app}", "version": "v1"},
            pilot_rpc=f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'rpc')]}",
            pilot_pub=f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'pub')]}",
            pilot_snapshot=f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'snapshot')]}",
            verifier=verifier, on_apply=lambda version, pid=pid: out.put((pid, version, time.monotonic()))))
    out.put(("ready", index, time.monotonic()))
    while not stop.wait(5):
        for p in proxies:
            p.heartbeat()
    for p in proxies:
        p.close()
    loop.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--proxies", type=int)
    parser.add_argument("--services", type=int)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4)
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
    try:
        keydir = work / "keys"
        for name in ("galley", "pilot", "bench"):
            keys.generate(keydir, name)
        config = work / "config"
        config.mkdir()
        write_atomically(config / "services.yaml", services_yaml(n_services))
        write_atomically(config / "dr.yaml", DR)
        write_atomically(config / "vs.yaml", vs_yaml(90))
        env = {**os.environ, "ZMESH_PORT_BASE": str(base)}
        procs.append(subprocess.Popen([MESHCTL, "galley", "--keys", str(keydir), "--config-dir",
                                       str(config)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([MESHCTL, "pilot", "--keys", str(keydir)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        pilot_ps = psutil.Process(procs[1].pid)
        time.sleep(1.0)
        per = [n_proxies // args.workers + (1 if i < n_proxies % args.workers else 0)
               for i in range(args.workers)]
        for i, count in enumerate(per):
            w = ctx.Process(target=worker, args=(i, count, apps, str(keydir), base, out, stop), daemon=True)
            w.start()
            workers.append(w)
        acks: dict[str, dict[str, float]] = {}
        ready = 0
        deadline = time.monotonic() + 300
        while ready < len(workers):
            try:
                item = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"only {ready} of {len(workers)} workers registered their proxies "
                                   "within 300 s") from None
            if item[0] == "ready":
                ready += 1
            else:
                acks.setdefault(item[1], {})[item[0]] = item[2]
        log(f"{n_proxies} proxies registered over {len(workers)} workers")
        client = RpcClient(f"tcp://127.0.0.1:{base + endpoints.OFFSETS[('pilot', 'rpc')]}",
                           keys.Keyring(keydir, "bench"), "pilot", timeout=5)

        def drain(until: float) -> None:
            while time.monotonic() < until:
                try:
                    proxy, version, t = out.get(timeout=max(0.01, until - time.monotonic()))
                except Exception:
                    return
                acks.setdefault(version, {})[proxy] = t

        drain(time.monotonic() + 3)
        latencies = []
        cpu_per_push = []
        for e in range(edits):
            cpu0 = pilot_ps.cpu_times()
            t0 = time.monotonic()
            write_atomically(config / "vs.yaml", vs_yaml(10 + e % 80))
            complete = None
            end = t0 + 20
            while time.monotonic() < end:
                drain(min(end, time.monotonic() + 0.05))
                fresh = [v for v, ps in acks.items() if ps and min(ps.values()) > t0]
                done = [v for v in fresh if len(acks[v]) >= n_proxies]
                if fresh and sum(len(acks[v]) for v in fresh) >= n_proxies:
                    complete = max(t for v in fresh for t in acks[v].values())
                    break
                if done:
                    complete = max(acks[done[0]].values())
                    break
            if complete is None:
                log(f"edit {e}: not every proxy ACKed within 20 s")
                continue
            latencies.append((complete - t0) * 1000)
            cpu1 = pilot_ps.cpu_times()
            cpu_per_push.append((cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000)
            time.sleep(0.2)
        rss_mb = pilot_ps.memory_info().rss / 2**20
        status = client.call("status")
        client.close()
        synced = sum(1 for r in status if r["state"] == "SYNCED")
    finally:
        stop.set()
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.kill()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    if not latencies:
        print(json.dumps({"benchmark": "pilot_convergence", "error": "no edit converged"}))
        return
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"{'proxies':>8} {'services':>8} {'edits':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'cpu/push ms':>11} {'rss MB':>7} {'synced':>7}")
    print(f"{n_proxies:>8} {n_services:>8} {len(latencies):>6} {p50:>8.1f} {p99:>8.1f} "
          f"{max(latencies):>8.1f} {statistics.median(cpu_per_push):>11.1f} {rss_mb:>7.1f} {synced:>7}")
    print(json.dumps({"benchmark": "pilot_convergence", "proxies": n_proxies, "services": n_services,
                      "edits": len(latencies), "p50_ms": p50, "p99_ms": p99, "max_ms": max(latencies),
                      "pilot_cpu_ms_per_push": statistics.median(cpu_per_push), "pilot_rss_mb": rss_mb,
                      "synced": synced, "goal": {"p99_ms_max": 100, "rss_mb_max": 300,
                                                 "met": p99 <= 100 and rss_mb <= 300}}))


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        log(f"failed: {exc}")
        print(json.dumps({"benchmark": "pilot_convergence", "error": str(exc)}))
        sys.exit(1)
