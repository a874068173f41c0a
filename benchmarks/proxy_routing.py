"""Proxy routing benchmark: µs per route match and per cluster pick on a 1000-service config.

Pilot translates a mesh of N services into one sidecar's config: every third service has a
VirtualService (a header match, a prefix match with an 80/20 split, a catch-all) and a
DestinationRule with subsets; every third other one a DestinationRule choosing round robin or
consistent hashing (ring hash, and Maglev for a few); the rest keep the defaults (least request).
The proxy compiles that config (dataplane.proxy.routing and .cluster) and each step of a request
is timed: virtual-host selection, route match, weighted-cluster pick, endpoint pick per load
balancer, and the whole chain, against a plain dict lookup of the Host header timed in the same run.

Prints a table of µs per operation with its ratio to that baseline, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.config.validate import load_text  # noqa: E402
from controlplane.pilot.model import Endpoint, Port, Protocol, Proxy, Service  # noqa: E402
from controlplane.pilot.networking import PushContext, build_proxy_config  # noqa: E402
from dataplane.proxy.cluster import Cluster, build_clusters  # noqa: E402
from dataplane.proxy.routing import Request, build_route_configs  # noqa: E402

NS = "default"
PORT = 9080
VERSIONS = ("v1", "v2", "v3")
BASELINE = "dict lookup of the Host (baseline)"
MAGLEV_EVERY = 200  # Maglev tables take ~0.1 s each to build in Python: only a few services


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def name(i: int) -> str:
    return f"svc-{i}"


def mesh(n: int) -> tuple[list[Service], list[Endpoint], str]:
    services, endpoints, docs = [], [], []
    for i in range(n):
        host = f"{name(i)}.{NS}.svc.cluster.local"
        services.append(Service(host, NS, [Port("http", PORT, Protocol.HTTP)], name=name(i),
                                selector={"app": name(i)}, addresses=[f"10.96.{i // 250}.{i % 250 + 1}"]))
        for j, version in enumerate(VERSIONS):
            endpoints.append(Endpoint(host, f"10.{1 + i // 250}.{i % 250}.{j + 1}", PORT, PORT,
                                      {"app": name(i), "version": version}))
        subsets = "  subsets:\n" + "".join(f"  - {{name: {v}, labels: {{version: {v}}}}}\n" for v in VERSIONS)
        if i % 3 == 0:
            docs.append(f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name(i)}, namespace: {NS}}}
spec:
  hosts: [{name(i)}]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: {name(i)}, subset: v2}}}}]
  - match: [{{uri: {{prefix: /api/}}}}]
    route:
    - {{destination: {{host: {name(i)}, subset: v1}}, weight: 80}}
    - {{destination: {{host: {name(i)}, subset: v2}}, weight: 20}}
    retries: {{attempts: 3, retryOn: "5xx,connect-failure"}}
  - route: [{{destination: {{host: {name(i)}, subset: v3}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name(i)}, namespace: {NS}}}
spec:
  host: {name(i)}
{subsets}""")
        elif i % 3 == 1:
            if i % MAGLEV_EVERY == 1:
                lb = "{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}"
            elif i % 2:
                lb = "{consistentHash: {httpHeaderName: x-user}}"
            else:
                lb = "{simple: ROUND_ROBIN}"
            docs.append(f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name(i)}, namespace: {NS}}}
spec:
  host: {name(i)}
  trafficPolicy:
    loadBalancer: {lb}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
""")
    return services, endpoints, "---\n".join(docs)


def requests(n_services: int, count: int, rng: random.Random) -> list[Request]:
    """Callers' requests: the short name or the FQDN with the port, some with a matching header or
    path, so header, prefix and catch-all routes are all taken."""
    out = []
    for _ in range(count):
        i = rng.randrange(n_services)
        authority = f"{name(i)}:{PORT}" if rng.random() < 0.5 else f"{name(i)}.{NS}.svc.cluster.local:{PORT}"
        headers = {"user-agent": "bench", "x-request-id": "r", "x-user": f"user-{rng.randrange(1000)}"}
        if rng.random() < 0.2:
            headers["end-user"] = "jason"
        path = "/api/items?page=2" if rng.random() < 0.5 else "/home"
        out.append(Request("GET", path, authority, headers))
    return out


def per_op_us(rows: dict[str, Callable[[int, int], None]], count: int, repeats: int,
              chunk: int = 500) -> dict[str, float]:
    """µs of CPU per operation of each row; `fn(lo, hi)` does operations lo..hi-1. A chunk counts its
    best of `repeats` runs in this process's CPU time, and every repeat runs every row in turn, so a
    burst of load on a shared machine spoils one run of one chunk, neither a row nor a ratio."""
    bounds = [(lo, min(lo + chunk, count)) for lo in range(0, count, chunk)]
    best = {label: [float("inf")] * len(bounds) for label in rows}
    for _ in range(repeats):
        for label, fn in rows.items():
            for i, (lo, hi) in enumerate(bounds):
                t0 = time.process_time_ns()
                fn(lo, hi)
                best[label][i] = min(best[label][i], time.process_time_ns() - t0)
    return {label: sum(times) / count / 1000 for label, times in best.items()}


def by_policy(clusters: dict[str, Cluster]) -> dict[str, list[Cluster]]:
    out: dict[str, list[Cluster]] = {}
    for c in clusters.values():
        if c.endpoints and len(c.endpoints) > 1:
            out.setdefault(c.policy, []).append(c)
    return out


def measure(n: int, count: int, repeats: int) -> dict[str, Any]:
    services, endpoints, yaml_text = mesh(n)
    t0 = time.perf_counter()
    loaded = load_text(yaml_text)
    assert not loaded.errors, loaded.errors[:3]
    push = PushContext(services, endpoints, loaded.resources)
    cfg = build_proxy_config(push, Proxy("client.default", NS, "10.200.0.1", {"app": "client"}))
    translate_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    routes = build_route_configs(cfg)[str(PORT)]
    routes_ms = (time.perf_counter() - t0) * 1000
    rng = random.Random(1)
    t0 = time.perf_counter()
    clusters = build_clusters(cfg, rng=rng)
    clusters_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    build_clusters(cfg, clusters, rng=rng)
    swap_ms = (time.perf_counter() - t0) * 1000
    log(f"{n} services: translate {translate_ms:.0f} ms, compile routes {routes_ms:.0f} ms, "
        f"clusters {clusters_ms:.0f} ms (swap {swap_ms:.0f} ms), {len(clusters)} clusters")

    reqs = requests(n, count, rng)
    authorities = [r.authority for r in reqs]
    table = {d: vh for vh in routes.virtual_hosts for d in vh.domains}
    raw = [(r.method, r.path, r.authority, r.headers) for r in reqs]
    matched = [route for r in reqs if (route := routes.match(r)) is not None]
    assert len(matched) == count
    us = random.Random(2)
    draws = [us.random() for _ in range(count)]
    keys = [r.headers["x-user"] for r in reqs]
    pools = by_policy(clusters)

    def baseline(lo: int, hi: int) -> None:
        for a in authorities[lo:hi]:
            table[a]

    def select(lo: int, hi: int) -> None:
        for a in authorities[lo:hi]:
            routes.select_virtual_host(a)

    def match(lo: int, hi: int) -> None:
        for r in reqs[lo:hi]:
            routes.match(r)

    def parse_and_match(lo: int, hi: int) -> None:
        for method, path, authority, headers in raw[lo:hi]:
            routes.match(Request(method, path, authority, headers))

    def weighted(lo: int, hi: int) -> None:
        for route, u in zip(matched[lo:hi], draws[lo:hi], strict=True):
            route.pick_cluster(u)

    def endpoint_pick(group: Sequence[Cluster], hashed: bool) -> Callable[[int, int], None]:
        chosen = [group[i % len(group)] for i in range(count)]

        def run(lo: int, hi: int) -> None:
            if hashed:
                for c, k in zip(chosen[lo:hi], keys[lo:hi], strict=True):
                    c.pick(k)
            else:
                for c in chosen[lo:hi]:
                    c.pick()
        return run

    def whole(lo: int, hi: int) -> None:
        pick_u = rng.random
        for method, path, authority, headers in raw[lo:hi]:
            route = routes.match(Request(method, path, authority, headers))
            if route is None or (picked := route.pick_cluster(pick_u())) is None:
                raise AssertionError(f"no route for {authority}{path}")
            cluster = clusters[picked.name]
            policy = cluster.hash_policy
            ep = cluster.pick(policy.key(headers) if policy else None)
            if ep is None:
                raise AssertionError(f"no endpoint in {cluster.name}")
            cluster.start(ep)
            cluster.finish(ep, 0, status=200)

    rows: list[tuple[str, Callable[[int, int], None]]] = [
        (BASELINE, baseline), ("select virtual host", select), ("route match", match),
        ("request + route match", parse_and_match), ("weighted cluster pick", weighted)]
    for policy in ("LEAST_REQUEST", "ROUND_ROBIN", "RING_HASH", "MAGLEV"):
        if pools.get(policy):
            hashed = policy in ("RING_HASH", "MAGLEV")
            rows.append((f"endpoint pick {policy}", endpoint_pick(pools[policy], hashed)))
    rows.append(("whole request (match+pick+start+finish)", whole))
    results = per_op_us(dict(rows), count, repeats)
    return {"results": results, "translate_ms": translate_ms, "compile_routes_ms": routes_ms,
            "build_clusters_ms": clusters_ms, "swap_clusters_ms": swap_ms, "clusters": len(clusters),
            "virtual_hosts": len(routes.virtual_hosts), "domains": len(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests and repeats (well under a minute)")
    args = parser.parse_args()
    count, repeats = (10_000, 7) if args.quick else (args.requests, args.repeats)
    out = measure(args.services, count, repeats)
    results = out["results"]
    base = results[BASELINE]
    print(f"{'operation':<42} {'µs/op':>8} {'x dict':>8}")
    for label, value in results.items():
        print(f"{label:<42} {value:>8.3f} {value / base:>8.1f}")
    print(f"compile: routes {out['compile_routes_ms']:.0f} ms, clusters {out['build_clusters_ms']:.0f} ms, "
          f"swap {out['swap_clusters_ms']:.0f} ms ({out['virtual_hosts']} virtual hosts, "
          f"{out['domains']} domains, {out['clusters']} clusters)")
    slug = {label: label.split(" (")[0].replace(" + ", "_").replace(" ", "_").lower() for label in results}
    print(json.dumps({"benchmark": "proxy_routing", "services": args.services, "requests": count,
                      "us_per_op": {slug[k]: round(v, 4) for k, v in results.items()},
                      "ratio_to_dict": {slug[k]: round(v / base, 2) for k, v in results.items()},
                      **{k: round(v, 1) for k, v in out.items() if k.endswith("_ms")},
                      "clusters": out["clusters"], "domains": out["domains"]}))


if __name__ == "__main__":
    main()
