"""Memory under steady traffic: the demo mesh (what `meshctl up` runs) carries requests at a fixed rate
for ten minutes, and every process's resident set must end within 10% of where it started.

Two streams, each paced at `--rate` requests/s (fixed intervals, a new connection per request, as
bookinfo's apps make them), both to productpage, which calls details and reviews (and reviews v2/v3
call ratings) over mutual TLS:

* mesh:  from the sleep pod through its sidecar (sleep -> productpage, mTLS end to end);
* edge:  from the host through HAProxy (`mode http`, a connection per request) to productpage's pod.

HAProxy is the baseline row: a proxy carrying the same rate in the same run. RSS of every process
(galley, pilot, citadel, the node agent, each pod's app, agent, proxy supervisor and workers,
HAProxy) is read after a warm-up of the same traffic and at the end. A request is an error unless
productpage answers 200 with details and reviews in it (no `error` anywhere).

As root every pod is a network namespace (mesh.py); otherwise, or with `--explicit`, the loopback
mesh (loopback.py). Needs haproxy (`make deps` installs it). Progress goes to stderr;
stdout gets the table and, as its last line, one JSON object. `--quick` drives traffic for half a minute
(its growth figures are a smoke test, not a verdict: a leak needs minutes to stand out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.proxy_l4 import Procs, ensure_tools, fmt, free_port, wait_listening  # noqa: E402
from meshctl.localmesh import netns  # noqa: E402
from meshctl.localmesh.loopback import LoopbackMesh  # noqa: E402
from meshctl.localmesh.mesh import APP_PORT, Mesh  # noqa: E402

FLAT = 10.0  # % growth allowed, start to end
THREADS = 8  # per stream: requests in flight when the mesh answers slower than the pacing
TIMEOUT = 10.0


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the processes ---------------------------------------------------------------------------------

def processes(mesh: Mesh, haproxy: subprocess.Popen) -> dict[str, psutil.Process]:
    """Every process of the mesh by a readable name, and the baseline."""
    out: dict[str, psutil.Process] = {}
    for proc in mesh.state.procs:
        if not netns.alive(proc.pid):
            continue
        p = psutil.Process(proc.pid)
        name, _, role = proc.name.partition(".")
        if role == "sidecar":  # the agent; its proxy supervisor; the supervisor's workers
            out[f"{name} agent"] = p
            for sup in p.children():
                out[f"{name} proxy"] = sup
                for i, worker in enumerate(sup.children()):
                    out[f"{name} worker {i}"] = worker
        elif role == "app":
            out[f"{name} app"] = p
        else:
            out[proc.name] = p
    root = psutil.Process(haproxy.pid)
    for i, p in enumerate([root, *root.children(recursive=True)]):
        out[f"haproxy (baseline){' ' + str(i) if i else ''}"] = p
    return out


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float | None]:
    """RSS per process in MiB; None for one that is gone (a restart is a finding, not a sample)."""
    out: dict[str, float | None] = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            out[name] = None
    return out


# -- the traffic -----------------------------------------------------------------------------------

@dataclass
class Stream:
    """One paced stream: request i starts at t0 + i/rate, on whichever thread is free."""

    name: str
    rate: float
    send: Callable[[], tuple[int, bytes]]
    sent: int = 0
    errors: int = 0
    late: int = 0  # started more than a second after its slot: the mesh could not keep the pace
    last_error: str = ""

    def run(self, t0: float, until: float, stop: threading.Event) -> None:
        lock = threading.Lock()
        slots = iter(range(1 << 62))

        def loop() -> None:
            while not stop.is_set():
                with lock:
                    at = t0 + next(slots) / self.rate
                if at >= until:
                    return
                wait = at - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    return
                late = wait < -1.0
                problem = check(self.send)
                with lock:
                    self.sent += 1
                    self.late += late
                    if problem:
                        self.errors += 1
                        self.last_error = problem

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def check(send: Callable[[], tuple[int, bytes]]) -> str:
    """'' when productpage answered whole; else what was wrong."""
    try:
        status, body = send()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    if status != 200:
        return f"status {status}"
    try:
        page = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(page, dict) or not {"details", "reviews"} <= page.keys() or '"error"' in body.decode():
        return f"incomplete page: {body[:200]!r}"
    return ""


def through(port: int) -> Callable[[], tuple[int, bytes]]:
    """A GET /productpage from the host through HAProxy on `port`."""
    url = f"http://127.0.0.1:{port}/productpage"

    def send() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return send


def from_sleep(mesh: Mesh) -> Callable[[], tuple[int, bytes]]:
    """A GET /productpage as the sleep pod's app makes it: through its sidecar (to the service's VIP,
    which iptables sends there, or in explicit mode to the sidecar's outbound address)."""
    sleep = mesh.pod("sleep")
    host = mesh.outbound_host(sleep) if isinstance(mesh, LoopbackMesh) else mesh.layout.vips["productpage"]
    headers = {"Host": f"productpage:{APP_PORT}"}
    return lambda: mesh.http(sleep, host, APP_PORT, "/productpage", headers, timeout=TIMEOUT)


def start_haproxy(procs: Procs, tmp: Path, server: str) -> tuple[int, subprocess.Popen]:
    """HAProxy in http mode in front of `server`, a new connection each side per request."""
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
    maxconn 1024
defaults
    mode http
    option httpclose
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server productpage {server}
""")
    proc = procs.start(["haproxy", "-db", "-f", str(conf)], tmp / "haproxy.out")
    wait_listening(port, proc)
    return port, proc


def drive(streams: list[Stream], seconds: float) -> None:
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [threading.Thread(target=s.run, args=(t0, t0 + seconds, stop), daemon=True) for s in streams]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()
        raise


# -- the report ------------------------------------------------------------------------------------

@dataclass
class Row:
    process: str
    start_mib: float | None
    end_mib: float | None
    growth_pct: float | None
    flat: bool


def rows(start: dict[str, float | None], end: dict[str, float | None]) -> list[Row]:
    out = []
    for name, a in start.items():
        b = end.get(name)
        growth = (b - a) * 100 / a if a and b is not None else None
        out.append(Row(name, a, b, growth, growth is not None and growth <= FLAT))
    return out


def print_table(table: list[Row]) -> None:
    width = max(len(r.process) for r in table)
    print(f"{'process':<{width}} {'rss start MiB':>14} {'rss end MiB':>12} {'growth %':>9} {'flat':>5}")
    for r in table:
        print(f"{r.process:<{width}} {fmt(r.start_mib, '>14.1f')} {fmt(r.end_mib, '>12.1f')} "
              f"{fmt(r.growth_pct, '>+9.1f')} {'yes' if r.flat else 'NO':>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="Measured duration (after the warm-up).")
    ap.add_argument("--warmup", type=float, default=30.0,
                    help="Seconds of the same traffic before the start sample.")
    ap.add_argument("--rate", type=float, default=10.0, help="Requests/s of each stream.")
    ap.add_argument("--workers", type=int, default=1, help="Worker processes per sidecar.")
    ap.add_argument("--explicit", action="store_true", help="The loopback mesh, even as root.")
    ap.add_argument("--quick", action="store_true", help="25 s measured after a 5 s warm-up.")
    opts = ap.parse_args()
    if opts.quick:
        opts.seconds, opts.warmup = 25.0, 5.0
    if shutil.which("haproxy") is None:
        ensure_tools()
    explicit = opts.explicit or os.geteuid() != 0 or netns.missing_tools() is not None
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-soak-"))
    tmp.chmod(0o755)  # sidecars running as 1337 read their key and certificates below it
    mesh = (LoopbackMesh(tmp / "run", workers=opts.workers, say=log) if explicit
            else Mesh(tmp / "run", host_access=True, workers=opts.workers, say=log))
    procs = Procs()
    try:
        mesh.up(timeout=120)
        page = mesh.pod("productpage")
        port, haproxy = start_haproxy(procs, tmp, f"{page.ip}:{APP_PORT}")

        def streams() -> list[Stream]:
            return [Stream("mesh", opts.rate, from_sleep(mesh)),
                    Stream("edge", opts.rate, through(port))]

        log(f"warm-up: {opts.warmup:g}s at {opts.rate:g}/s per stream")
        warm = streams()
        drive(warm, opts.warmup)
        watched = processes(mesh, haproxy)
        start = rss_mib(watched)
        log(f"measuring: {opts.seconds:g}s at {opts.rate:g}/s per stream, {len(watched)} processes")
        began = time.monotonic()
        measured = streams()
        drive(measured, opts.seconds)
        elapsed = time.monotonic() - began
        end = rss_mib(watched)
    finally:
        procs.stop_all()
        mesh.down()
        shutil.rmtree(tmp, ignore_errors=True)
    table = rows(start, end)
    print_table(table)
    sent = sum(s.sent for s in measured)
    errors = sum(s.errors for s in measured)
    print(f"\n{sent} requests in {elapsed:.0f}s ({sent / elapsed:.1f}/s; "
          + ", ".join(f"{s.name} {s.sent} sent, {s.errors} errors, {s.late} late" for s in measured)
          + f"); warm-up {sum(s.sent for s in warm)} requests, {sum(s.errors for s in warm)} errors")
    for s in measured:
        if s.last_error:
            print(f"  last {s.name} error: {s.last_error}")
    mesh_rows = [r for r in table if not r.process.startswith("haproxy")]
    all_flat = all(r.flat for r in mesh_rows)
    print(f"every mesh process flat within {FLAT:g}%: {'yes' if all_flat else 'NO'}")
    print(json.dumps({"benchmark": "soak", "quick": opts.quick, "mode": "explicit" if explicit else "netns",
                      "seconds": round(elapsed, 1), "rate_per_stream": opts.rate, "requests": sent,
                      "errors": errors, "streams": [{k: v for k, v in asdict(s).items() if k != "send"}
                                                    for s in measured],
                      "flat_pct": FLAT, "all_flat": all_flat, "processes": [asdict(r) for r in table]}))


if __name__ == "__main__":
    main()
