"""L4 forwarding rate of the zmesh sidecar against HAProxy in tcp mode, both in front of nginx.

wrk (`-t1 -c32`, keep-alive HTTP/1.1) drives, for a 19-byte body and a 1 MiB body:

* direct:       wrk -> nginx (the floor every proxy adds to);
* haproxy:      wrk -> HAProxy `mode tcp` (Debian's build, default threads) -> nginx;
* zmesh-1w/2w:  wrk -> `meshctl proxy --mode explicit` with 1 / 2 SO_REUSEPORT workers: a loopback
                TCP listener for the service port forwarding at L4 to an nginx cluster;
* zmesh-1w-copy: one worker with `--no-splice`, the measurement behind tcp.py's copy/splice choice.

Per run: req/s, p50/p99 from `wrk --latency`, the proxy's CPU µs per request (psutil, all
of its processes), its RSS, and ratios to direct and to HAProxy on the same body. Goals:
zmesh >= 1.0x HAProxy req/s on the small body and >= 1.3x on the 1 MiB body.

Installs wrk, haproxy and nginx when missing (ops/deps.sh, as `make deps`). Everything runs on 127.0.0.1,
every process it starts is stopped at the end. Progress goes to stderr; stdout gets the
table and, as its very last line, one JSON object. `--quick` finishes in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
SMALL_BODY = b"hello from nginx!!\n"  # 19 bytes
BIG_SIZE = 1 << 20
GOAL = {"small_vs_haproxy": 1.0, "big_vs_haproxy": 1.3}


def log(msg: str) -> None:
    print(f"[proxy_l4 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """wrk, haproxy and nginx, among the rest: `make deps` (ops/deps.sh) installs what is missing."""
    subprocess.run([str(ROOT / "ops" / "deps.sh")], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Procs:
    """Every process the benchmark starts, each in its own session so it can be stopped whole."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = log_path.open("wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT, env=env)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def nginx_conf(tmp: Path, listens: list[str]) -> Path:
    """An nginx config in `tmp` serving /small (SMALL_BODY) and /big (BIG_SIZE random bytes) on `listens`."""
    (tmp / "big.bin").write_bytes(os.urandom(BIG_SIZE))
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    body = SMALL_BODY.decode().replace("\n", "\\n")
    listen = "".join(f"        listen {address} backlog=4096;\n" for address in listens)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
{listen}        location = /small {{ return 200 "{body}"; }}
        location = /big {{ alias {tmp}/big.bin; }}
    }}
}}
""")
    return conf


def start_nginx(procs: Procs, tmp: Path) -> int:
    port = free_port()
    conf = nginx_conf(tmp, [f"127.0.0.1:{port}"])
    proc = procs.start(["nginx", "-c", str(conf), "-e", str(tmp / "nginx-error.log")], tmp / "nginx.out")
    wait_listening(port, proc)
    return port


def start_haproxy(procs: Procs, tmp: Path, backend: int) -> tuple[int, subprocess.Popen]:
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server nginx 127.0.0.1:{backend}
""")
    proc = procs.start(["haproxy", "-db", "-f", str(conf)], tmp / "haproxy.out")
    wait_listening(port, proc)
    return port, proc


MESHCTL = Path(sys.executable).with_name("meshctl")
SERVICE = "nginx.default.svc.cluster.local"
TCP_CLUSTER = f"outbound|80||{SERVICE}"
POOL = {"tcp": {"connect_timeout_ms": 10000}}


def endpoint(port: int) -> dict[str, Any]:
    """One plain-text endpoint on 127.0.0.1, as pilot sends it."""
    return {"address": "127.0.0.1", "port": port, "weight": 1, "locality": "", "healthy": True, "labels": {},
            "service_account": "", "tls_mode": "disabled"}


def listeners(inbound: list[dict[str, Any]], outbound: list[dict[str, Any]]) -> dict[str, Any]:
    return {"outbound_traffic_policy": "ALLOW_ANY", "outbound": outbound, "inbound": inbound}


def tcp_config(upstream_port: int, service_port: int) -> dict[str, Any]:
    """What pilot sends a client sidecar for one TCP service port: in explicit mode the sidecar
    listens on 127.0.0.1:`service_port` and forwards every connection to the cluster at L4."""
    listener = {"name": f"{SERVICE}_{service_port}", "service": SERVICE, "addresses": [],
                "port": service_port, "protocol": "TCP",
                "tcp_routes": [{"match": {}, "clusters": [{"name": TCP_CLUSTER, "weight": 100}]}]}
    cluster = {"name": TCP_CLUSTER, "direction": "outbound", "type": "EDS", "service": SERVICE, "port": 80,
               "connection_pool": POOL}
    return {"version": "bench", "listeners": listeners([], [listener]), "routes": {},
            "clusters": {TCP_CLUSTER: cluster}, "endpoints": {TCP_CLUSTER: [endpoint(upstream_port)]}}


def start_sidecar(procs: Procs, tmp: Path, config: dict[str, Any], workers: int, label: str,
                  access_log: bool, listen_port: int, checkout: Path | None = None,
                  extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`meshctl proxy --mode explicit` from a config file (with `checkout`'s code when given, and
    `extra` arguments); waits until `listen_port` accepts."""
    path = tmp / f"{label}.json"
    path.write_text(json.dumps(config))
    args = [str(MESHCTL), "proxy", "--id", f"bench-{label}", "--labels", f"app={label}", "--config",
            str(path),
            "--mode", "explicit", "--workers", str(workers), "--inbound-port", str(free_port()),
            "--admin-port", str(free_port()), "--stats-port", str(free_port()),
            "--access-log" if access_log else "--no-access-log", *extra]
    if label.endswith("server"):  # its one inbound listener stands on --inbound-port in explicit mode
        args[args.index("--inbound-port") + 1] = str(listen_port)
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    proc = procs.start(args, Path("/dev/null") if access_log else tmp / f"{label}.out", env)
    wait_listening(listen_port, proc)
    return proc


def start_zmesh(procs: Procs, tmp: Path, backend: int, workers: int,
                splice: bool) -> tuple[int, subprocess.Popen]:
    """`meshctl proxy` with an explicit TCP listener in front of nginx (no access log, as HAProxy)."""
    port = free_port()
    label = f"zmesh-{workers}w" + ("" if splice else "-copy")
    proc = start_sidecar(procs, tmp, tcp_config(backend, port), workers, label, False, port,
                         extra=() if splice else ("--no-splice",))
    return port, proc


@dataclass
class Run:
    config: str
    body: str
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mib_per_s: float = 0.0
    requests: int = 0
    errors: int = 0
    cpu_us_per_req: float | None = None
    rss_mib: float | None = None
    vs_direct: float | None = None
    vs_haproxy: float | None = None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SIZE = {"B": 1 / (1 << 20), "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str, run: Run) -> None:
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        run.rps = float(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        run.requests = int(m.group(1))
    if m := re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out):
        run.mib_per_s = float(m.group(1)) * _SIZE.get(m.group(2), 1.0)
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        run.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        run.p99_ms = _ms(m.group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    run.errors = errors


def tree(proc: subprocess.Popen | None) -> list[psutil.Process]:
    if proc is None:
        return []
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(ps: list[psutil.Process]) -> float:
    total = 0.0
    for p in ps:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def wrk(port: int, path: str, seconds: float, proxies: list[subprocess.Popen], run: Run) -> None:
    """wrk -t1 -c32 against `port`; CPU and RSS of every process of `proxies` (proxy_l7 uses it too)."""
    ps = [p for proc in proxies for p in tree(proc)]
    before = cpu_seconds(ps)
    done = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds:g}s", "--latency", f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode or "Requests/sec" not in done.stdout:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    parse_wrk(done.stdout, run)
    if ps:
        run.cpu_us_per_req = (cpu_seconds(ps) - before) * 1e6 / max(run.requests, 1)
        rss = 0
        for p in ps:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += p.memory_info().rss
        run.rss_mib = rss / (1 << 20)


def wrk_round(targets: dict[str, tuple[int, list[subprocess.Popen]]], configs: list[str],
              bodies: tuple[tuple[str, str], ...], warmup: float, seconds: float,
              samples: dict[tuple[str, str], list[Run]]) -> None:
    """One wrk run (after an optional warm-up) per config and body; `targets`: config -> (port, the
    proxy's processes, whose CPU and RSS are measured)."""
    for body, path in bodies:
        for config in configs:
            port, proxies = targets[config]
            if warmup:
                wrk(port, path, warmup, [], Run(config, body))
            run = Run(config, body)
            log(f"{config} {body}: wrk -t1 -c32 -d{seconds:g}s")
            wrk(port, path, seconds, proxies, run)
            samples[(config, body)].append(run)


def fmt(x: float | None, spec: str) -> str:
    """`spec` like '>9.2f'; None prints as a right-aligned '-'."""
    return format(x, spec) if x is not None else format("-", spec.split(".")[0])


def median(values: list[float | None]) -> float | None:
    xs = sorted(v for v in values if v is not None)
    return xs[len(xs) // 2] if xs else None


def combine(config: str, body: str, rounds: list[Run]) -> Run:
    """The median of each number over the rounds (other load on the box skews single runs)."""
    return Run(config, body, rps=median([r.rps for r in rounds]) or 0.0,
               p50_ms=median([r.p50_ms for r in rounds]), p99_ms=median([r.p99_ms for r in rounds]),
               mib_per_s=median([r.mib_per_s for r in rounds]) or 0.0,
               requests=sum(r.requests for r in rounds), errors=sum(r.errors for r in rounds),
               cpu_us_per_req=median([r.cpu_us_per_req for r in rounds]),
               rss_mib=max((r.rss_mib for r in rounds if r.rss_mib is not None), default=None))


def report(samples: dict[tuple[str, str], list[Run]], configs: list[str], bodies: list[tuple[str, str]],
           rounds: int, seconds: float) -> tuple[list[Run], dict[str, float | None]]:
    """Medians per (config, body) with their ratios to direct and HAProxy, printed as a table;
    returns the runs and the best zmesh ratio to HAProxy per body (proxy_l7.py uses it too)."""
    runs = [combine(c, b, samples[(c, b)]) for b, _ in bodies for c in configs]
    base = {(r.config, r.body): r.rps for r in runs}
    for r in runs:
        if base.get(("direct", r.body)):
            r.vs_direct = r.rps / base[("direct", r.body)]
        if base.get(("haproxy", r.body)):
            r.vs_haproxy = r.rps / base[("haproxy", r.body)]
    head = (f"{'config':<14}{'body':>6}{'req/s':>10}{'MiB/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'cpu us/req':>11}{'rss MiB':>9}{'/direct':>9}{'/haproxy':>9}{'errors':>7}")
    print(f"wrk -t1 -c32, {rounds} round(s) of {seconds:g} s, medians")
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r.config:<14}{r.body:>6}{r.rps:>10.0f}{r.mib_per_s:>9.1f}{fmt(r.p50_ms, '>9.3f')}"
              f"{fmt(r.p99_ms, '>9.3f')}{fmt(r.cpu_us_per_req, '>11.1f')}{fmt(r.rss_mib, '>9.1f')}"
              f"{fmt(r.vs_direct, '>9.2f')}{fmt(r.vs_haproxy, '>9.2f')}{r.errors:>7}")
    best = {body: max((r.vs_haproxy or 0.0 for r in runs if r.config.startswith("zmesh") and r.body == body),
                      default=None) for body, _ in bodies}
    return runs, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 2 s runs, no warm-up (under a minute)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument("--configs", default="direct,haproxy,zmesh-1w,zmesh-2w,zmesh-1w-copy")
    opts = ap.parse_args()
    seconds = 2.0 if opts.quick else opts.duration
    rounds = 1 if opts.quick else opts.rounds
    warmup = 0.0 if opts.quick else 1.0
    configs = opts.configs.split(",")
    bodies = (("19B", "/small"), ("1MiB", "/big"))
    ensure_tools()
    procs = Procs()
    samples: dict[tuple[str, str], list[Run]] = {(c, b): [] for c in configs for b, _ in bodies}
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-proxy-l4-"))
    try:
        backend = start_nginx(procs, tmp)
        targets: dict[str, tuple[int, list[subprocess.Popen]]] = {}
        for config in configs:  # all up at once, so every round visits each under the same load
            if config == "direct":
                targets[config] = (backend, [])
            elif config == "haproxy":
                port, proc = start_haproxy(procs, tmp, backend)
                targets[config] = (port, [proc])
            elif m := re.fullmatch(r"zmesh-(\d+)w(-copy)?", config):
                port, proc = start_zmesh(procs, tmp, backend, int(m.group(1)), splice=not m.group(2))
                targets[config] = (port, [proc])
            else:
                raise SystemExit(f"unknown config {config}")
        for i in range(rounds):
            log(f"round {i + 1}/{rounds}")
            wrk_round(targets, configs, bodies, warmup, seconds, samples)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    runs, best = report(samples, configs, bodies, rounds, seconds)
    print(json.dumps({"benchmark": "proxy_l4", "seconds": seconds, "rounds": rounds, "goal": GOAL,
                      "best_vs_haproxy": best, "runs": [asdict(r) for r in runs]}))


if __name__ == "__main__":
    main()
