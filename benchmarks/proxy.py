"""The sidecar against HAProxy, in one go: L4 (proxy_l4.py), L7 and two hops (proxy_l7.py), and
the idle memory of a worker holding a 1000-service config.

Both parts install and start their peers themselves (wrk, haproxy, nginx from Debian) and
run on 127.0.0.1. This script runs them one after the other with the same flags, prints
their tables, measures the idle worker, and ends with one JSON line holding every number
and the issue's goals:

    L7 req/s >= 1.0x HAProxy http        L4 req/s >= 1.0x HAProxy tcp (19-byte bodies)
    1 MiB throughput >= 1.3x HAProxy tcp  two sidecars add <= 0.25 ms p50 at 1000 req/s
    idle RSS with 1000 services <= 40 MB per worker

`--quick` runs each part in its quick mode (about two minutes in all). `--baseline-checkout PATH`
runs the L7 part paired against another checkout's sidecar (proxy_l7.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.proxy_l4 import free_port  # noqa: E402

MESHCTL = Path(sys.executable).with_name("meshctl")


def log(msg: str) -> None:
    print(f"[proxy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_part(script: str, quick: bool, *extra: str) -> dict[str, Any]:
    """Run one part, pass its table through, return its JSON line."""
    args = [sys.executable, str(ROOT / "benchmarks" / script)] + (["--quick"] if quick else []) + list(extra)
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=True).stdout
    lines = out.strip().splitlines()
    print("\n".join(lines[:-1]) + "\n")
    return json.loads(lines[-1])


def idle_worker_mb(services: int) -> dict[str, float]:
    """RSS and USS of one idle worker applying pilot's config for `services` services."""
    from benchmarks.pilot_convergence import services_yaml
    from controlplane.config.validate import load_text
    from controlplane.pilot.model import Proxy
    from controlplane.pilot.networking import PushContext, build_proxy_config
    from controlplane.pilot.serviceregistry.aggregate import services_from_config

    resources = load_text(services_yaml(services)).resources
    found, endpoints = services_from_config(resources)
    config = build_proxy_config(PushContext(found, endpoints, resources),
                                Proxy("idle-1", "default", "10.0.0.1", {"app": "svc-0", "version": "v1"}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        admin = free_port()
        proc = subprocess.Popen(
            [str(MESHCTL), "proxy", "--id", "idle-1", "--config", str(path), "--workers", "1",
             "--outbound-port", str(free_port()), "--inbound-port", str(free_port()),
             "--admin-port", str(admin), "--stats-port", str(free_port()), "--no-access-log"],
            stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            time.sleep(1.0)
            worker = psutil.Process(proc.pid).children()[0]
            mem = worker.memory_full_info()
            return {"rss_mb": mem.rss / 2**20, "uss_mb": mem.uss / 2**20,
                    "config_mb": path.stat().st_size / 2**20}
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline-checkout", default=None,
                    help="L7 also runs this checkout's sidecar, paired with this one (proxy_l7.py)")
    opts = ap.parse_args()
    log("L4: direct, HAProxy tcp, zmesh L4 1 and 2 workers")
    l4 = run_part("proxy_l4.py", opts.quick)
    log("L7: direct, HAProxy http, zmesh L7 1 and 2 workers, two hops, paced latency")
    l7 = run_part("proxy_l7.py", opts.quick,
                  *(["--baseline-checkout", opts.baseline_checkout] if opts.baseline_checkout else []))
    log("idle worker with 1000 services")
    idle = idle_worker_mb(1000)
    print(f"idle worker, 1000 services ({idle['config_mb']:.1f} MB of config): "
          f"RSS {idle['rss_mb']:.1f} MB, USS {idle['uss_mb']:.1f} MB")

    def ratio(part: dict[str, Any], config: str, body: str) -> float | None:
        hits = (r["vs_haproxy"] for r in part["runs"] if r["config"] == config and r["body"] == body)
        return next(hits, None)

    results = {
        "l7_vs_haproxy_http": ratio(l7, "zmesh-1w", "19B"),
        "l4_vs_haproxy_tcp": ratio(l4, "zmesh-1w", "19B"),
        "bulk_vs_haproxy_tcp": ratio(l4, "zmesh-1w", "1MiB"),
        "two_sidecars_added_p50_ms": l7.get("two_sidecars_added_p50_ms"),
        "idle_worker_rss_mb": idle["rss_mb"], "idle_worker_uss_mb": idle["uss_mb"],
    }
    goals = {"l7_vs_haproxy_http": (">=", 1.0), "l4_vs_haproxy_tcp": (">=", 1.0),
             "bulk_vs_haproxy_tcp": (">=", 1.3), "two_sidecars_added_p50_ms": ("<=", 0.25),
             "idle_worker_rss_mb": ("<=", 40.0)}
    met = {k: results[k] is not None and (results[k] >= bound if op == ">=" else results[k] <= bound)
           for k, (op, bound) in goals.items()}
    print(f"\n{'goal':<28} {'measured':>10} {'bound':>10} {'met':>5}")
    for k, (op, bound) in goals.items():
        value = results[k]
        shown = "-" if value is None else f"{value:.2f}"
        print(f"{k:<28} {shown:>10} {op + ' ' + str(bound):>10} {'yes' if met[k] else 'no':>5}")
    reference = l7.get("two_haproxy_hops_added_p50_ms")
    print(f"(reference, same run: two HAProxy http hops add "
          f"{'-' if reference is None else f'{reference:.2f}'} ms p50 at the same paced rate)")
    print(json.dumps({"benchmark": "proxy", "quick": opts.quick, "results": results, "goals_met": met,
                      "l4": l4, "l7": l7, "idle": idle}))


if __name__ == "__main__":
    main()
