"""Fan-out latency of the bus: one publisher, N subscriber sockets, time until the LAST one applied.

Three configurations run side by side, so every zmesh number has an in-run baseline:

* raw:   pyzmq PUB/SUB with CURVE and msgpack, no protocol on top (the floor);
* zmesh: bus.pubsub Publisher/Subscriber (CURVE + ZAP, Ed25519 signatures, Clone-pattern sync);
* relay: 10 bus.relay.Relay processes, each re-publishing over ipc:// to its local subscribers.

Subscribers are spread over worker processes started with "spawn" (no zmq context crosses a fork).
The parent publishes 10 KiB updates, each carrying its index, and records `time.monotonic()` just
before publishing; each worker records, per index, the latest apply time among its subscribers.
`time.monotonic()` is the system-wide CLOCK_MONOTONIC on Linux, so the two are comparable.
The next update goes out `--gap-ms` after every subscriber applied the previous one (or after
`--update-timeout`), so updates never pile up and each latency is one update's own.

Progress goes to stderr; stdout gets the table and, as its very last line, one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import pstats
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from benchmarks import _fanout_workers as workers
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import _fanout_workers as workers

PAD = bytes(10 * 1024)
KEY = workers.PREFIX + "k"
GOAL = {"n": 1000, "p99_ms_max": 100.0, "ratio_max": 1.3}


def log(msg: str) -> None:
    """Progress to stderr, so stdout stays the table plus one JSON line."""
    print(f"[bus_fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Options:
    sizes: list[int]
    configs: list[str]
    workers: int
    relays: int
    relay_locals: int
    warmup: int
    updates: int
    gap: float
    update_timeout: float
    idle: float
    setup_timeout: float
    profile_dir: Path | None
    quick: bool


@dataclass
class Result:
    config: str
    n: int
    workers: int
    updates: int = 0
    complete: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    resyncs: int = 0
    setup_resyncs: int = 0
    setup_causes: dict[str, float] = field(default_factory=dict)
    resync_causes: dict[str, float] = field(default_factory=dict)
    auth_failures: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_update: dict[str, float] = field(default_factory=dict)
    idle_cores: dict[str, float] = field(default_factory=dict)
    other_load_cores: float | None = None
    seconds: float = 0.0
    error: str | None = None
    ratio: float | None = None

    def pct(self, q: float) -> float | None:
        return percentile(self.latencies_ms, q)

    def row(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)
        return {"config": self.config, "n": self.n, "workers": self.workers,
                "updates": self.updates, "complete": self.complete,
                "p50_ms": r(self.pct(50)), "p99_ms": r(self.pct(99)),
                "max_ms": r(max(self.latencies_ms) if self.latencies_ms else None),
                "p99_ratio_vs_raw": r(self.ratio), "resyncs": self.resyncs,
                "resync_causes": self.resync_causes, "setup_resyncs": self.setup_resyncs,
                "setup_resync_causes": self.setup_causes,
                "auth_failures": self.auth_failures,
                "cpu_ms_per_update": {k: round(v, 2) for k, v in self.cpu_ms_per_update.items()},
                "idle_cores": {k: round(v, 3) for k, v in self.idle_cores.items()},
                "other_load_cores": r(self.other_load_cores),
                "seconds": round(self.seconds, 1), "error": self.error}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), so p99 of 50 samples is not
    just the max."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- CPU accounting, per thread kind, from /proc (no profiler distorting the run) --

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of `pids`, split into libzmq I/O threads (CURVE, TCP) and the rest
    (Python). Tells whether time goes to the transport, which raw pays too, or to our code."""
    out = {"zmq_io": 0.0, "python": 0.0}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            secs = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
            out["zmq_io" if comm.startswith("ZMQbg") else "python"] += secs
    return out


def system_busy() -> float:
    """CPU seconds the whole machine has spent busy: with ours subtracted, the load of anything
    else running meanwhile (a test suite, say), which on 2 cores skews every number here."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent between two `proc_cpu` readings."""
    return {k: after[k] - before[k] for k in after}


# -- publishers (in this process) --

class ZmeshPublisher:
    """bus.pubsub.Publisher on its own Loop thread, CURVE on loopback, signing as "pilot"."""

    def __init__(self, keydir: Path) -> None:
        from bus.keys import Keyring
        from bus.loop import Loop
        from bus.pubsub import Publisher
        from bus.signing import Signer

        ring = Keyring(keydir, "pilot")
        self.loop = Loop("bench-pub").start()
        self.pub = self.loop.call_sync(lambda: Publisher(
            self.loop, pub_endpoint="tcp://127.0.0.1:*", snapshot_endpoint="tcp://127.0.0.1:*",
            keyring=ring, signer=Signer("pilot", ring.signing_key()), name="bench"))
        self.endpoints = {"pub": self.pub.pub_endpoint, "snapshot": self.pub.snapshot_endpoint}
        self.send(workers.SEED)

    def send(self, i: int) -> None:
        self.pub.set(KEY, {"i": i, "pad": PAD})

    def idle(self) -> None:
        """Nothing to do while waiting: the publisher's heartbeats welcome subscribers."""

    def close(self) -> None:
        self.loop.stop()


class RawPublisher:
    """A plain PUB socket as CURVE server with the pilot's keys; no ZAP handler, so any client key
    is accepted (the baseline pays for encryption, not for authentication bookkeeping)."""

    def __init__(self, keydir: Path) -> None:
        import msgpack
        import zmq

        from bus.keys import Keyring

        self._pack = msgpack.packb
        self.ctx = zmq.Context()
        keys = Keyring(keydir, "pilot").curve()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.linger = 0
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_publickey = keys.public
        self.sock.curve_server = True
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoints = {"pub": self.sock.getsockopt_string(zmq.LAST_ENDPOINT), "snapshot": ""}
        self._last_hello = 0.0

    def send(self, i: int) -> None:
        self.sock.send_multipart([KEY.encode(), self._pack({"i": i, "pad": PAD}, use_bin_type=True)])

    def idle(self) -> None:
        """PUB/SUB has no handshake: say a small hello every 100 ms until every socket has heard one
        (10 KiB hellos to 1000 joining sockets would flood the 2 cores and distort what follows)."""
        if time.monotonic() - self._last_hello > 0.1:
            self._last_hello = time.monotonic()
            self.sock.send_multipart([KEY.encode(), self._pack({"i": workers.SEED}, use_bin_type=True)])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# -- one configuration --

class Workers:
    """The worker processes of one configuration and the parent's view of their messages."""

    def __init__(self, kind: str, sizes: list[int], base_cfg: dict[str, Any], profile: str | None) -> None:
        self.ctx = mp.get_context("spawn")
        self.results: Any = self.ctx.Queue()
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.ready: set[int] = set()
        self.done: dict[int, set[int]] = {}
        self.payloads: dict[int, dict[str, Any]] = {}
        for wid, n in enumerate(sizes):
            cfg = {**base_cfg, "n_subs": n, "keyname": f"w{wid}",
                   "profile": profile if (profile and wid == 0) else None}
            parent_end, child_end = self.ctx.Pipe()
            p = self.ctx.Process(target=workers.run_worker, args=(kind, wid, cfg, child_end, self.results),
                                 name=f"fanout-{kind}-w{wid}", daemon=True)
            p.start()
            child_end.close()
            self.procs.append(p)
            self.conns.append(parent_end)

    def pump(self, timeout: float) -> None:
        """Take every message waiting (blocking up to `timeout` for the first); fail on a dead worker."""
        msgs: list[tuple[str, int, Any]] = []
        try:
            msgs.append(self.results.get(timeout=timeout))
            while True:
                msgs.append(self.results.get_nowait())
        except queue.Empty:
            pass
        for kind, wid, data in msgs:
            if kind == "ready":
                self.ready.add(wid)
            elif kind == "done":
                self.done.setdefault(data, set()).add(wid)
            elif kind == "result":
                self.payloads[wid] = data
            elif kind == "error":
                raise RuntimeError(f"worker {wid} failed:\n{data}")
        for wid, p in enumerate(self.procs):
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"worker {wid} exited with code {p.exitcode}")

    def wait(self, cond: Callable[[], bool], timeout: float, idle: Callable[[], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if idle is not None:
                idle()
            self.pump(min(left, 0.02 if idle else 0.2))
        return True

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):  # already gone
                c.send("stop")

    def cleanup(self) -> None:
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        for c in self.conns:
            c.close()
        self.results.close()
        self.results.cancel_join_thread()


def split(n: int, parts: int) -> list[int]:
    """N subscribers over at most `parts` workers, as evenly as possible (N=10 on 4: 3/3/2/2)."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def run_config(kind: str, n: int, sizes: list[int], opts: Options, keydir: Path, tmp: Path) -> Result:
    """Publish warm-up + measured updates to `sizes` subscribers per worker and time each fan-out."""
    res = Result(kind, n, len(sizes))
    started = time.monotonic()
    total_updates = opts.warmup + opts.updates
    budget = opts.setup_timeout + total_updates * (opts.update_timeout + opts.gap) + 60
    pub: ZmeshPublisher | RawPublisher | None = None
    ws: Workers | None = None
    profile = None
    if opts.profile_dir is not None:
        profile = str(opts.profile_dir / f"{kind}-n{n}-w0.prof")
    try:
        pub = RawPublisher(keydir) if kind == "raw" else ZmeshPublisher(keydir)
        ipcdir = tmp / f"ipc-{kind}-{n}"
        ipcdir.mkdir(exist_ok=True)
        base = {**pub.endpoints, "keydir": str(keydir), "ipcdir": str(ipcdir),
                "deadline": time.monotonic() + budget}
        log(f"{kind} N={n}: starting {len(sizes)} workers ({'/'.join(map(str, sizes))} subscribers)")
        ws = Workers(kind, sizes, base, profile)
        if not ws.wait(lambda: len(ws.ready) == len(sizes), opts.setup_timeout, pub.idle):
            raise TimeoutError(f"only {len(ws.ready)}/{len(sizes)} workers ready after "
                               f"{opts.setup_timeout:.0f}s")
        log(f"{kind} N={n}: all subscribers ready after {time.monotonic() - started:.1f}s; "
            f"{opts.warmup} warm-up + {opts.updates} measured updates")
        me, pids = [os.getpid()], [p.pid for p in ws.procs]
        ws.wait(lambda: False, 0.5)  # let the join's tail (late snapshot replies) drain first
        idle0, t_idle = {"pub": proc_cpu(me), "sub": proc_cpu(pids)}, time.monotonic()
        ws.wait(lambda: False, opts.idle)  # background cost: heartbeats, timers, keep-alives
        idle_s = time.monotonic() - t_idle
        for side, pp in (("pub", me), ("sub", pids)):
            for k, v in cpu_delta(proc_cpu(pp), idle0[side]).items():
                res.idle_cores[f"{side}_{k}"] = v / idle_s
        sent: dict[int, float] = {}
        slow = 0
        cpu0 = {"pub": proc_cpu(me), "sub": proc_cpu(pids)}
        busy0, t_phase = system_busy(), time.monotonic()
        for i in range(total_updates):
            sent[i] = time.monotonic()
            pub.send(i)
            if not ws.wait(lambda i=i: len(ws.done.get(i, ())) == len(sizes), opts.update_timeout):
                slow += 1
            time.sleep(opts.gap)
        ws.wait(lambda: len(ws.done.get(total_updates - 1, ())) == len(sizes), opts.update_timeout)
        ours = 0.0
        for side, pp in (("pub", me), ("sub", pids)):
            for k, v in cpu_delta(proc_cpu(pp), cpu0[side]).items():
                res.cpu_ms_per_update[f"{side}_{k}"] = v * 1000 / total_updates
                ours += v
        res.other_load_cores = max(0.0, system_busy() - busy0 - ours) / (time.monotonic() - t_phase)
        if res.other_load_cores > 0.25:
            log(f"{kind} N={n}: WARNING: other processes used {res.other_load_cores:.2f} cores meanwhile; "
                "these numbers are skewed")
        ws.stop()
        if not ws.wait(lambda: len(ws.payloads) == len(sizes), 30):
            raise TimeoutError(f"only {len(ws.payloads)}/{len(sizes)} workers returned results")
        _sum_counters(res, list(ws.payloads.values()))
        res.updates = opts.updates
        for i in range(opts.warmup, total_updates):
            got = [ws.payloads[w] for w in range(len(sizes))]
            if all(p["counts"].get(i, 0) >= sizes[w] for w, p in enumerate(got)):
                res.complete += 1
                res.latencies_ms.append((max(p["times"][i] for p in got) - sent[i]) * 1000)
        if slow:
            log(f"{kind} N={n}: {slow} updates not fully applied within {opts.update_timeout}s")
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        log(f"{kind} N={n}: FAILED: {res.error}")
    finally:
        if ws is not None:
            ws.stop()
            ws.cleanup()
        if pub is not None:
            pub.close()
    res.seconds = time.monotonic() - started
    if not res.error:
        log(f"{kind} N={n}: p50={res.pct(50):.1f}ms p99={res.pct(99):.1f}ms "
            f"complete={res.complete}/{res.updates} resyncs={res.resyncs} {res.resync_causes} "
            f"(while joining: {res.setup_resyncs} {res.setup_causes}) "
            f"handshake failures={res.auth_failures or 0} "
            f"cpu ms/update={ {k: round(v, 1) for k, v in res.cpu_ms_per_update.items()} } "
            f"idle cores={ {k: round(v, 2) for k, v in res.idle_cores.items()} } "
            f"({res.seconds:.1f}s)")
    if profile and Path(profile).exists():
        _summarise_profile(profile)
    return res


def _sum_counters(res: Result, payloads: list[dict[str, Any]]) -> None:
    """Resyncs during the measured updates (with causes) apart from those while joining."""
    res.resyncs = sum(p.get("resyncs", 0) for p in payloads)
    res.setup_resyncs = sum(p.get("setup_resyncs", 0) for p in payloads)
    for p in payloads:
        before = p.get("setup_counters", {}).get("resyncs", {})
        for cause, n in before.items():
            res.setup_causes[cause] = res.setup_causes.get(cause, 0) + n
        for cause, n in p.get("counters", {}).get("resyncs", {}).items():
            if n - before.get(cause, 0):
                res.resync_causes[cause] = res.resync_causes.get(cause, 0) + n - before.get(cause, 0)
        for reason, n in p.get("counters", {}).get("auth_failures", {}).items():
            res.auth_failures[reason] = res.auth_failures.get(reason, 0) + n


def _summarise_profile(path: str) -> None:
    """Top functions of worker 0's receive thread, to stderr: where does per-subscriber time go?"""
    log(f"profile of worker 0 written to {path}; top by own time:")
    stats = pstats.Stats(path, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(15)


# -- report --

def add_ratios(results: list[Result]) -> None:
    """p99 over the raw p99 at the same total N (the nearest N when raw did not run at that N)."""
    raw = {r.n: r.pct(99) for r in results if r.config == "raw" and r.pct(99)}
    for r in results:
        if r.config == "raw" or not raw or r.pct(99) is None:
            continue
        base_n = min(raw, key=lambda m: (abs(math.log(m / r.n)), m))
        r.ratio = r.pct(99) / raw[base_n]


def goal_verdict(results: list[Result]) -> dict[str, Any]:
    z = next((r for r in results if r.config == "zmesh" and r.n == GOAL["n"] and not r.error), None)
    verdict: dict[str, Any] = {**GOAL, "met": None, "zmesh_p99_ms": None, "ratio": None}
    if z is None or z.pct(99) is None:
        verdict["note"] = f"zmesh did not run at N={GOAL['n']}"
        return verdict
    p99 = z.pct(99)
    verdict.update(zmesh_p99_ms=round(p99, 3), ratio=None if z.ratio is None else round(z.ratio, 3))
    verdict["met"] = bool(p99 <= GOAL["p99_ms_max"] and z.ratio is not None
                          and z.ratio <= GOAL["ratio_max"] and z.complete == z.updates)
    return verdict


def print_table(results: list[Result]) -> None:
    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)
    head = f"{'config':<7} {'N':>5} {'p50_ms':>8} {'p99_ms':>8} {'max_ms':>8} {'p99_ratio_vs_raw':>16} " \
           f"{'complete':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        row = r.row()
        done = "ERROR" if r.error else f"{r.complete}/{r.updates}"
        print(f"{r.config:<7} {r.n:>5} {f(row['p50_ms']):>8} {f(row['p99_ms']):>8} {f(row['max_ms']):>8} "
              f"{f(row['p99_ratio_vs_raw'], '.2f'):>16} {done:>9}")


# -- main --

def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=100 only, 10 relays x 10 locals (< 1 min)")
    ap.add_argument("--sizes", help="comma-separated N values [10,100,1000; quick: 100]")
    ap.add_argument("--configs", default="raw,zmesh,relay", help="subset of raw,zmesh,relay")
    ap.add_argument("--workers", type=int, default=4, help="worker processes for raw and zmesh")
    ap.add_argument("--relays", type=int, default=10, help="relay processes")
    ap.add_argument("--relay-locals", type=int, help="local subscribers per relay [100; quick: 10]")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--updates", type=int, help="measured updates per configuration [100; quick: 50]")
    ap.add_argument("--gap-ms", type=float, default=30.0,
                    help="pause after an update is fully applied before the next one")
    ap.add_argument("--idle", type=float, default=1.0,
                    help="seconds of no updates, after setup, to measure background CPU")
    ap.add_argument("--update-timeout", type=float, default=5.0, help="seconds to wait for one fan-out")
    ap.add_argument("--setup-timeout", type=float, default=120.0,
                    help="seconds for all subscribers to connect and sync")
    ap.add_argument("--profile", type=Path, help="cProfile worker 0 of each configuration into this dir")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else ([100] if a.quick else [10, 100, 1000])
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = set(configs) - {"raw", "zmesh", "relay"}
    if bad:
        ap.error(f"unknown configs: {', '.join(sorted(bad))}")
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)
    return Options(sizes=sizes, configs=configs, workers=a.workers, relays=a.relays,
                   relay_locals=a.relay_locals or (10 if a.quick else 100), warmup=a.warmup,
                   updates=a.updates or (50 if a.quick else 100), gap=a.gap_ms / 1000,
                   update_timeout=a.update_timeout, idle=a.idle, setup_timeout=a.setup_timeout,
                   profile_dir=a.profile, quick=a.quick)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, then the JSON line; non-zero if any run failed."""
    from bus import keys, logs

    opts = parse_args(argv)
    workers.raise_nofile()
    logs.configure("WARNING")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fanout-"))
    results: list[Result] = []
    try:
        keydir = tmp / "keys"
        for name in ["pilot", *(f"w{k}" for k in range(max(opts.workers, opts.relays)))]:
            keys.generate(keydir, name)
        for n in opts.sizes:
            for kind in ("raw", "zmesh"):
                if kind in opts.configs:
                    results.append(run_config(kind, n, split(n, opts.workers), opts, keydir, tmp))
        if "relay" in opts.configs:
            sizes = [opts.relay_locals] * opts.relays
            results.append(run_config("relay", sum(sizes), sizes, opts, keydir, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    add_ratios(results)
    verdict = goal_verdict(results)
    print_table(results)
    goal = f"goal (N={GOAL['n']}: zmesh p99 <= {GOAL['p99_ms_max']:.0f} ms and <= {GOAL['ratio_max']}x raw)"
    if verdict["met"] is None:
        print(f"{goal}: not evaluated ({verdict.get('note', 'no data')})")
    else:
        ratio = "no raw baseline" if verdict["ratio"] is None else f"{verdict['ratio']}x raw"
        print(f"{goal}: {'MET' if verdict['met'] else 'NOT MET'} (p99 {verdict['zmesh_p99_ms']} ms, {ratio})")
    log(f"done in {time.monotonic() - t0:.1f}s")
    print(json.dumps({"benchmark": "bus_fanout", "quick": opts.quick,
                      "results": [r.row() for r in results], "goal": verdict}), flush=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
