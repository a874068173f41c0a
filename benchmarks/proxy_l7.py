"""L7 (HTTP/1.1) rate of the zmesh sidecar against HAProxy in http mode, both in front of nginx.

wrk (`-t1 -c32`, keep-alive HTTP/1.1) drives, for a 19-byte body and a 1 MiB body:

* direct:       wrk -> nginx (the floor every proxy adds to);
* haproxy:      wrk -> HAProxy `mode http` (Debian's build, default threads) -> nginx;
* zmesh-1w/2w:  wrk -> `meshctl proxy --mode explicit` with 1 / 2 SO_REUSEPORT workers: a loopback
                listener for the service port routing by Host (Istio's default route: no timeout,
                2 retries on connect-failure/refused-stream/503) to an nginx cluster;
* zmesh-2hop:   wrk -> client sidecar (outbound) -> server sidecar (inbound) -> nginx, one
                worker each: what a request between two meshed pods pays.

Per run: req/s, p50/p99 from `wrk --latency`, the proxy's CPU µs per request (psutil, all of its
processes; both sidecars for 2hop), its RSS, and ratios to direct and to HAProxy on the same body.
Goal: zmesh >= 1.0x HAProxy req/s on the small body.

Then the latency two sidecars add at a fixed 1000 req/s: p50 of zmesh-2hop minus p50 of direct,
both paced by wrk with a Lua `delay()` script (wrk2 is not in Debian): 10 connections, each
waiting an exponentially distributed time (mean 10 ms) before its next request, so arrivals are
Poisson at 1000/s rather than a burst of 10 every 10 ms. Two HAProxy hops are measured the same
way as the reference. At that rate little queues, so the difference is the proxies' own latency
(on an idle machine that includes waking each process).

Installs wrk, haproxy and nginx with apt-get when missing (helpers shared with proxy_l4.py).
Everything runs on 127.0.0.1; every process it starts is stopped at the end. Progress goes to
stderr; stdout gets the tables and, as its very last line, one JSON object. `--quick` finishes in
under a minute. `--access-log` turns the sidecars' JSON access log on (to /dev/null).

`--baseline-checkout PATH` compares two versions of the sidecar in one run: every zmesh config
also runs as `base-<config>` with PATH's code (say `git worktree add /tmp/old <commit>`; its
`dataplane` package wins through PYTHONPATH), in the same interleaved rounds, and a last table
gives new/base for req/s and cpu µs/req per config and body (the issue's "within 5%").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.proxy_l4 import (  # noqa: E402
    POOL,
    SERVICE,
    Procs,
    Run,
    endpoint,
    ensure_tools,
    fmt,
    free_port,
    listeners,
    parse_wrk,
    report,
    start_nginx,
    start_sidecar,
    wait_listening,
    wrk_round,
)

GOAL = {"small_vs_haproxy": 1.0}
CLUSTER = "outbound|80||nginx.default.svc.cluster.local"
PACED_RATE = 1000
PACED_CONNECTIONS = 10


def log(msg: str) -> None:
    print(f"[proxy_l7 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_haproxy_http(procs: Procs, tmp: Path, backend: int) -> tuple[int, subprocess.Popen]:
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server nginx 127.0.0.1:{backend}
""")
    proc = procs.start(["haproxy", "-db", "-f", str(conf)], tmp / "haproxy.out")
    wait_listening(port, proc)
    return port, proc


DEFAULT_RETRIES = {"attempts": 2, "per_try_timeout_ms": 0, "retriable_status_codes": [503],
                   "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled",
                                "retriable-status-codes"]}


def client_config(upstream_port: int, service_port: int) -> dict[str, Any]:
    """What pilot sends a client sidecar for one HTTP service (Istio's default route); in explicit
    mode the sidecar listens on 127.0.0.1:`service_port` for it."""
    route = {"name": "default", "match": {}, "timeout_ms": 0, "retries": DEFAULT_RETRIES,
             "clusters": [{"name": CLUSTER, "weight": 100}]}
    vhost = {"name": f"{SERVICE}:80", "service": SERVICE, "domains": ["*"], "routes": [route]}
    cluster = {"name": CLUSTER, "direction": "outbound", "type": "EDS", "service": SERVICE, "port": 80,
               "connection_pool": POOL}
    listener = {"name": f"{SERVICE}_{service_port}", "service": SERVICE, "addresses": [],
                "port": service_port, "protocol": "HTTP", "route_config": "80"}
    return {"version": "bench", "listeners": listeners([], [listener]),
            "routes": {"80": {"name": "80", "virtual_hosts": [vhost]}},
            "clusters": {CLUSTER: cluster}, "endpoints": {CLUSTER: [endpoint(upstream_port)]}}


def server_config(app_port: int) -> tuple[dict[str, Any], str]:
    """What pilot sends the server sidecar: an inbound listener to the app on localhost."""
    name = f"inbound|{app_port}||"
    listener = {"name": f"inbound_{app_port}", "port": app_port, "protocol": "HTTP", "mtls_mode": "DISABLE",
                "cluster": name, "services": [{"service": SERVICE, "port": 80}]}
    cluster = {"name": name, "direction": "inbound", "port": app_port, "type": "STATIC",
               "connection_pool": POOL}
    return {"version": "bench", "listeners": listeners([listener], []), "routes": {},
            "clusters": {name: cluster}, "endpoints": {name: [endpoint(app_port)]}}, name


def paced_p50(port: int, seconds: float, tmp: Path) -> float | None:
    """p50 latency (ms) at PACED_RATE req/s: wrk, each connection waiting before every request."""
    script = tmp / "pace.lua"
    mean_ms = 1000 * PACED_CONNECTIONS / PACED_RATE
    # exponential gaps (Poisson arrivals): a constant delay() keeps the connections in step, so
    # the "paced" load becomes a burst of PACED_CONNECTIONS requests every mean_ms, which measures
    # queueing behind the burst, not a sidecar's latency; wrk truncates delays to whole ms
    gap = f"-{mean_ms:g} * math.log(1 - math.random())"
    script.write_text(f"function delay() return math.floor({gap} + 0.5) end\n")
    args = ["wrk", "-t1", f"-c{PACED_CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s", str(script),
            f"http://127.0.0.1:{port}/small"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30)
    run = Run("paced", "19B")
    parse_wrk(done.stdout, run)
    return run.p50_ms


def paired_table(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    """new/base per zmesh config and body, for req/s and cpu µs/req (medians of the same rounds)."""
    by = {(r.config, r.body): r for r in runs}
    out: dict[str, dict[str, float | None]] = {}
    print(f"\n{'config':<14}{'body':>6}{'req/s new':>11}{'req/s base':>11}{'ratio':>7}"
          f"{'cpu new':>9}{'cpu base':>9}{'ratio':>7}")
    for (config, body), new in by.items():
        old = by.get((f"base-{config}", body))
        if old is None:
            continue
        rps = new.rps / old.rps if old.rps else None
        cpu = new.cpu_us_per_req / old.cpu_us_per_req \
            if new.cpu_us_per_req is not None and old.cpu_us_per_req else None
        out[f"{config}/{body}"] = {"rps_ratio": rps, "cpu_ratio": cpu}
        print(f"{config:<14}{body:>6}{new.rps:>11.0f}{old.rps:>11.0f}{fmt(rps, '>7.3f')}"
              f"{fmt(new.cpu_us_per_req, '>9.1f')}{fmt(old.cpu_us_per_req, '>9.1f')}{fmt(cpu, '>7.3f')}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 2 s runs, no warm-up (under a minute)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument("--configs", default="direct,haproxy,zmesh-1w,zmesh-2w,zmesh-2hop")
    ap.add_argument("--access-log", action="store_true", help="sidecars write their JSON access log")
    ap.add_argument("--baseline-checkout", type=Path, default=None,
                    help="also run every zmesh config with this checkout's code, paired (base-<config>)")
    opts = ap.parse_args()
    base_dir = opts.baseline_checkout.resolve() if opts.baseline_checkout else None
    if base_dir is not None and not (base_dir / "dataplane" / "proxy").is_dir():
        raise SystemExit(f"--baseline-checkout {base_dir}: no dataplane/proxy there")
    seconds = 2.0 if opts.quick else opts.duration
    rounds = 1 if opts.quick else opts.rounds
    warmup = 0.0 if opts.quick else 1.0
    configs = opts.configs.split(",")
    if base_dir is not None:
        configs += [f"base-{c}" for c in configs if c.startswith("zmesh")]
    bodies = (("19B", "/small"), ("1MiB", "/big"))
    ensure_tools()
    procs = Procs()
    samples: dict[tuple[str, str], list[Run]] = {(c, b): [] for c in configs for b, _ in bodies}
    paced: dict[str, list[float]] = {"direct": [], "haproxy-2hop": [], "zmesh-2hop": []}
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-proxy-l7-"))
    try:
        backend = start_nginx(procs, tmp)
        targets: dict[str, tuple[int, list[subprocess.Popen]]] = {}
        for config in configs:  # all up at once, so every round visits each under the same load
            checkout = base_dir if config.startswith("base-") else None
            kind = config.removeprefix("base-")
            if config == "direct":
                targets[config] = (backend, [])
            elif config == "haproxy":
                port, proc = start_haproxy_http(procs, tmp, backend)
                targets[config] = (port, [proc])
                front = tmp / "haproxy-front"  # two HAProxy hops: the paced baseline for two sidecars
                front.mkdir()
                front_port, front_proc = start_haproxy_http(procs, front, port)
                targets["haproxy-2hop"] = (front_port, [front_proc, proc])
            elif m := re.fullmatch(r"zmesh-(\d+)w", kind):
                port = free_port()
                proc = start_sidecar(procs, tmp, client_config(backend, port), int(m.group(1)), config,
                                     opts.access_log, port, checkout)
                targets[config] = (port, [proc])
            elif kind == "zmesh-2hop":
                cfg, _ = server_config(backend)
                server_port, client_port = free_port(), free_port()
                prefix = "base-" if checkout else ""
                server = start_sidecar(procs, tmp, cfg, 1, prefix + "server", opts.access_log, server_port,
                                       checkout)
                client = start_sidecar(procs, tmp, client_config(server_port, client_port), 1,
                                       prefix + "client", opts.access_log, client_port, checkout)
                targets[config] = (client_port, [client, server])
            else:
                raise SystemExit(f"unknown config {config}")
        for i in range(rounds):
            log(f"round {i + 1}/{rounds}")
            wrk_round(targets, configs, bodies, warmup, seconds, samples)
            for config in paced:
                if config in targets:
                    log(f"round {i + 1}/{rounds} {config}: paced at {PACED_RATE} req/s")
                    p50 = paced_p50(targets[config][0], seconds, tmp)
                    if p50 is not None:
                        paced[config].append(p50)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    runs, best = report(samples, configs, bodies, rounds, seconds)
    paired = paired_table(runs) if base_dir is not None else None
    p50 = {k: (sorted(v)[len(v) // 2] if v else None) for k, v in paced.items()}

    def over_direct(config: str) -> float | None:
        return p50[config] - p50["direct"] if p50[config] is not None and p50["direct"] is not None else None

    added, haproxy_added = over_direct("zmesh-2hop"), over_direct("haproxy-2hop")
    print(f"\npaced at {PACED_RATE} req/s (wrk + Lua delay(), {PACED_CONNECTIONS} connections): "
          f"p50 direct {fmt(p50['direct'], '.3f')} ms, two sidecars {fmt(p50['zmesh-2hop'], '.3f')} ms "
          f"(added {fmt(added, '.3f')} ms), two HAProxy hops {fmt(p50['haproxy-2hop'], '.3f')} ms "
          f"(added {fmt(haproxy_added, '.3f')} ms)")
    print(json.dumps({"benchmark": "proxy_l7", "seconds": seconds, "rounds": rounds, "goal": GOAL,
                      "access_log": opts.access_log, "best_vs_haproxy": best,
                      "paced_rate": PACED_RATE, "paced_p50_ms": p50, "two_sidecars_added_p50_ms": added,
                      "two_haproxy_hops_added_p50_ms": haproxy_added,
                      "baseline_checkout": str(base_dir) if base_dir else None, "paired": paired,
                      "runs": [asdict(r) for r in runs]}))


if __name__ == "__main__":
    main()
