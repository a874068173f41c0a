"""Config pipeline benchmark: load+validate throughput, and edit-to-publish latency.

1. Load and validate N resources (zmesh) vs parsing the same files with PyYAML alone.
2. With N resources in force in a running `meshctl galley` (directory source), edit one
   file and time until a bus subscriber has the change; baseline: a bare inotify watcher
   that reads the file and sends it over raw pyzmq, with no validation or debounce.
3. The same through etcd: galley's etcd source vs a bare etcd watch.

Prints a table with ratios to the baselines, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bus import keys  # noqa: E402
from bus.context import context  # noqa: E402
from bus.loop import Loop  # noqa: E402
from bus.pubsub import Subscriber  # noqa: E402
from bus.signing import Verifier  # noqa: E402
from controlplane.config.validate import load_paths  # noqa: E402
from controlplane.galley.etcd import EtcdClient  # noqa: E402
from controlplane.galley.inotify import Inotify  # noqa: E402

PER_FILE = 10
MESHCTL = str(Path(sys.executable).with_name("meshctl"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resource_docs(i: int, weight: int = 80) -> str:
    """A VirtualService, a DestinationRule or a ServiceEntry, by turns."""
    kind = i % 3
    if kind == 0:
        return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs-{i}}}\n"
                f"spec:\n  hosts: [svc-{i}]\n  http:\n  - match: [{{uri: {{prefix: /api/{i}}}}}]\n"
                f"    route:\n    - destination: {{host: svc-{i}, subset: v1}}\n      weight: {weight}\n"
                f"    - destination: {{host: svc-{i}, subset: v2}}\n      weight: {100 - weight}\n"
                f"    timeout: 2s\n    retries: {{attempts: 3, perTryTimeout: 500ms}}\n")
    if kind == 1:
        return (f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr-{i}}}\n"
                f"spec:\n  host: svc-{i}\n  trafficPolicy:\n    loadBalancer: {{simple: LEAST_REQUEST}}\n"
                f"    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}\n"
                f"  subsets:\n  - name: v1\n    labels: {{version: v1}}\n"
                f"  - name: v2\n    labels: {{version: v2}}\n")
    return (f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se-{i}}}\n"
            f"spec:\n  hosts: [ext-{i}.example.com]\n"
            f"  ports: [{{number: 443, name: https, protocol: HTTPS}}]\n"
            f"  resolution: DNS\n  location: MESH_EXTERNAL\n")


def first_vs(f: int) -> int:
    """The index of file f's first VirtualService (the one edits change)."""
    return f * PER_FILE + (-f * PER_FILE) % 3


def edited_weight(edit: int) -> int:
    """Distinct for every edit below 79, and never the initial 80."""
    return 80 if edit == 0 else edit % 79 + 1


def file_text(f: int, edit: int = 0) -> str:
    """File f holds resources f*PER_FILE ... f*PER_FILE+9; `edit` sets its first VS's weight."""
    first = f * PER_FILE
    docs = [resource_docs(i, weight=edited_weight(edit) if i == first_vs(f) else 80)
            for i in range(first, first + PER_FILE)]
    return "---\n".join(docs)


def write_tree(directory: Path, n: int) -> int:
    files = n // PER_FILE
    for f in range(files):
        (directory / f"f{f:05d}.yaml").write_text(file_text(f))
    return files


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. load + validate ------------------------------------------------------------------------

def bench_load(directory: Path, n: int) -> list[dict]:
    files = sorted(directory.glob("*.yaml"))
    t = time.perf_counter()
    parsed = sum(1 for f in files for d in yaml.load_all(f.read_text(), Loader=yaml.CSafeLoader) if d)
    base = time.perf_counter() - t
    t = time.perf_counter()
    result = load_paths([directory])
    ours = time.perf_counter() - t
    assert len(result.resources) == n == parsed and not result.errors, result.errors[:3]
    return [{"case": "load", "impl": "libyaml-parse-only", "n": n, "per_s": n / base, "seconds": base},
            {"case": "load", "impl": "zmesh-load+validate", "n": n, "per_s": n / ours, "seconds": ours,
             "ratio": ours / base}]


# -- 2./3. edit to publish -----------------------------------------------------------------------

class Watcher:
    """A bus subscriber to galley/; records when each key reaches a value predicate."""

    def __init__(self, keydir: Path, base: int) -> None:
        self.loop = Loop("bench").start()
        self.values: dict[str, object] = {}
        self.changed = threading.Condition()
        ring = keys.Keyring(keydir, "bench")
        self.sub = self.loop.call_sync(lambda: Subscriber(
            self.loop, pub_endpoint=f"tcp://127.0.0.1:{base}",
            snapshot_endpoint=f"tcp://127.0.0.1:{base + 1}", prefix="galley/VirtualService/",
            keyring=ring, server="galley",
            verifier=Verifier(ring.trusted_signers), on_change=self._on_change, silence_timeout=10,
            snapshot_timeout=30))

    def _on_change(self, key: str, value: object) -> None:
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def wait(self, pred, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
        return time.monotonic()

    def close(self) -> None:
        self.loop.stop()


def weight_of(value: object) -> int | None:
    try:
        return value["spec"]["http"][0]["route"][0]["weight"]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None


def start_galley(keydir: Path, base: int, source: list[str]) -> subprocess.Popen:
    return subprocess.Popen([MESHCTL, "galley", "--keys", str(keydir), "--port-base", str(base), *source],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_edits(watcher: Watcher, edits: int, files: int, do_edit) -> list[float]:
    latencies = []
    for e in range(1, edits + 1):
        f = (e * 7919) % files
        key = f"galley/VirtualService/default/vs-{first_vs(f)}"
        want = edited_weight(e)
        t0 = time.monotonic()
        do_edit(f, e)
        t1 = watcher.wait(lambda key=key, want=want: weight_of(watcher.values.get(key)) == want, 10)
        if t1 is None:
            raise RuntimeError(f"edit {e} of file {f} never arrived")
        latencies.append((t1 - t0) * 1000)
        time.sleep(0.03)
    return latencies


def bench_dir_publish(workdir: Path, keydir: Path, n: int, edits: int) -> list[dict]:
    config = workdir / "config"
    files = len(list(config.glob("*.yaml")))
    base = 23000 + os.getpid() % 500 * 10
    proc = start_galley(keydir, base, ["--config-dir", str(config)])
    watcher = Watcher(keydir, base)
    rows = []
    try:
        vs_count = len(range(0, n, 3))
        log(f"galley loading {n} resources ...")
        if watcher.wait(lambda: len(watcher.values) >= vs_count, 180) is None:
            raise RuntimeError(f"galley published {len(watcher.values)} of {vs_count} VirtualServices")

        def edit(f: int, e: int) -> None:
            tmp = config / f".f{f:05d}.tmp"
            tmp.write_text(file_text(f, e))
            os.replace(tmp, config / f"f{f:05d}.yaml")

        lat = time_edits(watcher, edits, files, edit)
        rows.append(row("dir edit->publish", "zmesh-galley", lat, n))
    finally:
        watcher.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    rows.insert(0, row("dir edit->publish", "inotify+raw-zmq", baseline_dir(config, files, edits), n))
    return rows


def baseline_dir(config: Path, files: int, edits: int) -> list[float]:
    """The floor: inotify -> read the file -> raw PUB -> raw SUB, in one process pair of threads."""
    ctx = context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.subscribe(b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    ino = Inotify()
    ino.watch(str(config))
    stop = threading.Event()

    def watch() -> None:
        import select
        poller = select.poll()
        poller.register(ino.fileno(), select.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                for ev in ino.read():
                    p = Path(ev.path)
                    if p.suffix == ".yaml" and p.exists():
                        pub.send_multipart([p.name.encode(), p.read_bytes()])

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.3)
    latencies = []
    try:
        for e in range(1, edits + 1):
            f = (e * 7919) % files
            name = f"f{f:05d}.yaml"
            t0 = time.monotonic()
            tmp = config / f".{name}.tmp"
            tmp.write_text(file_text(f, e))
            os.replace(tmp, config / name)
            while sub.poll(5000):
                if sub.recv_multipart()[0] == name.encode():
                    latencies.append((time.monotonic() - t0) * 1000)
                    break
            time.sleep(0.03)
    finally:
        stop.set()
        t.join(2)
        ino.close()
        pub.close(0)
        sub.close(0)
    return latencies


def bench_etcd_publish(workdir: Path, keydir: Path, n: int, edits: int) -> list[dict]:
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        log("etcd not installed: skipping the etcd rows")
        return []
    cport, pport = free_port(), free_port()
    endpoint, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    etcd = subprocess.Popen([etcd_bin, "--name", "b", "--data-dir", str(workdir / "etcd"),
                             "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"b={peer}", "--quota-backend-bytes", str(2 << 30)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = EtcdClient(endpoint)
    rows = []
    try:
        for _ in range(100):
            try:
                client.get_prefix("/")
                break
            except Exception:
                time.sleep(0.1)
        files = n // PER_FILE
        log(f"writing {files} etcd keys ...")
        for f in range(files):
            client.put(f"/bench/f{f:05d}", file_text(f))
        base = 24000 + os.getpid() % 500 * 10
        proc = start_galley(keydir, base, ["--etcd", endpoint, "--etcd-prefix", "/bench/"])
        watcher = Watcher(keydir, base)
        try:
            vs_count = len(range(0, n, 3))
            if watcher.wait(lambda: len(watcher.values) >= vs_count, 180) is None:
                raise RuntimeError("galley did not load from etcd")
            lat = time_edits(watcher, edits, files,
                             lambda f, e: client.put(f"/bench/f{f:05d}", file_text(f, e)))
            rows.append(row("etcd put->publish", "zmesh-galley", lat, n))
        finally:
            watcher.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        rows.insert(0, row("etcd put->publish", "raw-etcd-watch", baseline_etcd(client, files, edits), n))
    finally:
        etcd.kill()
        etcd.wait(10)
    return rows


def baseline_etcd(client: EtcdClient, files: int, edits: int) -> list[float]:
    revision, _ = client.get_prefix("/bench/")
    seen: dict[str, float] = {}
    cond = threading.Condition()
    stop = threading.Event()

    def watch() -> None:
        try:
            for ev in client.watch("/bench/", revision + 1, idle_timeout=2):
                with cond:
                    seen[ev.key + ev.value[-40:]] = time.monotonic()
                    cond.notify_all()
                if stop.is_set():
                    return
        except Exception:
            return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.3)
    latencies = []
    for e in range(1, edits + 1):
        f = (e * 7919) % files
        text = file_text(f, e + 1000)
        token = f"/bench/f{f:05d}" + text[-40:]
        t0 = time.monotonic()
        client.put(f"/bench/f{f:05d}", text)
        with cond:
            cond.wait_for(lambda token=token: token in seen, 5)
        if token in seen:
            latencies.append((seen[token] - t0) * 1000)
        time.sleep(0.03)
    stop.set()
    return latencies


def row(case: str, impl: str, lat: list[float], n: int) -> dict:
    return {"case": case, "impl": impl, "n": n, "edits": len(lat), "p50_ms": statistics.median(lat),
            "p99_ms": percentile(lat, 99), "max_ms": max(lat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 resources, 20 edits (under a minute)")
    parser.add_argument("--resources", type=int, default=None)
    parser.add_argument("--edits", type=int, default=None)
    args = parser.parse_args()
    n = args.resources or (2000 if args.quick else 10_000)
    edits = args.edits or (20 if args.quick else 50)
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-bench-config-"))
    try:
        keydir = workdir / "keys"
        for name in ("galley", "bench"):
            keys.generate(keydir, name)
        config = workdir / "config"
        config.mkdir()
        write_tree(config, n)
        log(f"load+validate {n} resources ...")
        rows = bench_load(config, n)
        rows += bench_dir_publish(workdir, keydir, n, edits)
        rows += bench_etcd_publish(workdir, keydir, n, edits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'case':<20} {'impl':<22} {'n':>6} {'rate/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'ratio':>6}")
    baselines: dict[str, dict] = {}
    for r in rows:
        base = baselines.setdefault(r["case"], r)
        if "per_s" in r:
            ratio = base["per_s"] / r["per_s"]
            print(f"{r['case']:<20} {r['impl']:<22} {r['n']:>6} {r['per_s']:>9.0f} {'':>8} {'':>8} {'':>8} "
                  f"{ratio:>6.2f}")
        else:
            r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
            print(f"{r['case']:<20} {r['impl']:<22} {r['n']:>6} {'':>9} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['p99_ratio']:>6.2f}")
    galley_p99 = [r["p99_ms"] for r in rows if r["impl"] == "zmesh-galley"]
    goal_met = bool(galley_p99) and max(galley_p99) <= 150
    print(json.dumps({"benchmark": "config_pipeline", "resources": n, "edits": edits, "results": rows,
                      "goal": {"p99_ms_max": 150, "met": goal_met}}))


if __name__ == "__main__":
    main()
