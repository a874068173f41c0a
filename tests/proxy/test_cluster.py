"""Upstream clusters: load-balancer distributions, consistent hashing, outlier ejection, panic mode,
connection-pool budgets, and state kept across config swaps."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy.cluster import (
    CONNECT_FAILURE,
    MAX_EJECTION_TIME_MS,
    TIMEOUT,
    UNLIMITED,
    Cluster,
    ConnectionPool,
    Endpoint,
    HashPolicy,
    build_clusters,
    stable_hash,
)
from dataplane.proxy.routing import Request, build_route_configs
from tests.pilot.test_translation import bookinfo, config, dr, files, host, resources

OD = {"consecutive_5xx_errors": 3, "consecutive_gateway_errors": 0, "interval_ms": 10_000,
      "base_ejection_time_ms": 30_000, "max_ejection_percent": 100, "min_health_percent": 0}


def endpoint_specs(n: int, **overrides: Any) -> list[dict[str, Any]]:
    return [{"address": f"10.0.0.{i}", "port": 8080, "weight": 1, "locality": "", "healthy": True,
             "labels": {}, "service_account": "", "tls_mode": "istio", **overrides} for i in range(n)]


def make(n: int = 4, lb: dict[str, Any] | None = None, od: dict[str, Any] | None = None,
         endpoints: list[dict[str, Any]] | None = None, previous: Cluster | None = None,
         seed: int = 1, **spec: Any) -> Cluster:
    body: dict[str, Any] = {"name": "c", "type": "EDS", "lb": lb or {"simple": "LEAST_REQUEST"}, **spec}
    if od is not None:
        body["outlier_detection"] = od
    return Cluster(body, endpoint_specs(n) if endpoints is None else endpoints, previous, random.Random(seed))


def picks(cluster: Cluster, n: int, **kw: Any) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        ep = cluster.pick(**kw)
        out[ep.key if ep else "none"] += 1
    return out


def fail(cluster: Cluster, ep: Endpoint, times: int, now: float = 0, status: int = 503) -> list[bool]:
    out = []
    for _ in range(times):
        cluster.start(ep)
        out.append(cluster.finish(ep, now, status=status))
    return out


# --- load balancers ------------------------------------------------------------------------------


def test_round_robin_takes_turns_and_weights_spread_by_earliest_deadline() -> None:
    rr = make(4, {"simple": "ROUND_ROBIN"})
    sequence = [rr.pick().key for _ in range(8)]
    assert sequence[:4] == sequence[4:] and len(set(sequence[:4])) == 4
    specs = [{"address": a, "port": 80, "weight": w} for a, w in (("a", 1), ("b", 2), ("c", 3))]
    weighted = make(endpoints=specs, lb={"simple": "ROUND_ROBIN"})
    counts = picks(weighted, 600)
    assert counts == {"a:80": 100, "b:80": 200, "c:80": 300}
    window = [weighted.pick().key for _ in range(6)]
    assert Counter(window) == {"a:80": 1, "b:80": 2, "c:80": 3}  # exact within every cycle


def test_random_is_uniform_or_by_weight() -> None:
    counts = picks(make(4, {"simple": "RANDOM"}), 40_000)
    assert all(9_600 <= c <= 10_400 for c in counts.values()) and len(counts) == 4  # sd ~87
    specs = [{"address": "a", "port": 80, "weight": 1}, {"address": "b", "port": 80, "weight": 3}]
    weighted = make(endpoints=specs, lb={"simple": "RANDOM"})
    counts = picks(weighted, 40_000)
    assert 9_650 <= counts["a:80"] <= 10_350  # 25%, sd ~87


def test_least_request_prefers_the_less_busy_of_two_random_choices() -> None:
    lr = make(2)
    a = lr.endpoints[0]
    for _ in range(10):
        lr.start(a)
    counts = picks(lr, 20_000)
    # a wins only when both draws are a: 1/4 of picks
    assert 4_700 <= counts[a.key] <= 5_300
    idle = picks(make(4), 40_000)
    assert all(9_600 <= c <= 10_400 for c in idle.values())
    # with many endpoints, a busy one is almost never chosen
    lr = make(10)
    busy = lr.endpoints[0]
    busy.active = 5
    assert picks(lr, 10_000)[busy.key] <= 150  # (1/10)^2 = 1%


@pytest.mark.parametrize(("lb", "low", "high"), [("LEAST_REQUEST", 0.03, 0.10), ("ROUND_ROBIN", 0.2, 0.2),
                                                  ("RANDOM", 0.18, 0.22)])
def test_least_request_sends_less_to_a_slow_endpoint(lb: str, low: float, high: float) -> None:
    """One request per tick; the slow endpoint takes 40 ticks to answer, the others 4."""
    c = make(5, {"simple": lb}, seed=3)
    slow = c.endpoints[0]
    answers: list[tuple[int, int, Endpoint]] = []
    hits = 0
    for t in range(20_000):
        while answers and answers[0][0] <= t:
            c.finish(heapq.heappop(answers)[2], t, status=200)
        ep = c.pick()
        assert ep is not None
        c.start(ep)
        hits += ep is slow
        heapq.heappush(answers, (t + (40 if ep is slow else 4), t, ep))
    assert low <= hits / 20_000 <= high


# --- consistent hash -----------------------------------------------------------------------------


@pytest.mark.parametrize("lb", [{"consistent_hash": {"http_header_name": "x-user", **size}}
                                for size in ({}, {"minimum_ring_size": 4096}, {"maglev_table_size": 65537})])
def test_consistent_hash_is_stable_balanced_and_minimally_disrupted(lb: dict[str, Any]) -> None:
    n = 10
    ch = make(n, lb)
    keys = [f"user-{i}" for i in range(5_000)]
    before = {k: ch.pick(k).key for k in keys}
    assert all(ch.pick(k).key == before[k] for k in keys[:500])  # same key, same endpoint
    # an independent cluster object (another proxy) agrees: the hash is not per process
    other = make(n, lb, seed=99)
    assert {k: other.pick(k).key for k in keys[:500]} == {k: before[k] for k in keys[:500]}
    spread = Counter(before.values())
    assert len(spread) == n and max(spread.values()) <= 1.25 * len(keys) / n
    # remove one endpoint: its keys move, and (ring) nothing else or (maglev) next to nothing else
    gone = "10.0.0.3:8080"
    smaller = make(endpoints=[e for e in endpoint_specs(n) if e["address"] != "10.0.0.3"], lb=lb)
    after = {k: smaller.pick(k).key for k in keys}
    moved = {k for k in keys if after[k] != before[k]}
    its_keys = {k for k in keys if before[k] == gone}
    assert gone not in after.values() and moved >= its_keys
    assert len(moved) <= (1.05 if "maglev_table_size" in lb["consistent_hash"] else 1) * len(its_keys)
    assert len(its_keys) <= 1.25 * len(keys) / n


@pytest.mark.parametrize("lb", [{"consistent_hash": {"use_source_ip": True}},
                                {"consistent_hash": {"use_source_ip": True, "maglev_table_size": 251}}])
def test_consistent_hash_skips_ejected_endpoints_and_gets_its_keys_back(lb: dict[str, Any]) -> None:
    ch = make(5, lb, od=OD | {"consecutive_5xx_errors": 1})
    keys = [f"10.9.{i // 256}.{i % 256}" for i in range(2_000)]
    before = {k: ch.pick(k) for k in keys}
    victim = ch.endpoints[2]
    assert fail(ch, victim, 1) == [True]
    during = {k: ch.pick(k) for k in keys}
    assert victim not in during.values()
    assert all(during[k] is before[k] for k in keys if before[k] is not victim)  # the rest stay put
    ch.tick(30_000)
    assert {k: ch.pick(k) for k in keys} == before


def test_consistent_hash_without_a_key_picks_at_random_and_retries_look_further() -> None:
    ch = make(4, {"consistent_hash": {"http_header_name": "x-user"}})
    assert len(picks(ch, 2_000)) == 4
    first = ch.pick("alice")
    assert first is not None and ch.pick("alice", avoid=[first]) is not first


def test_hash_policy_extracts_the_configured_key() -> None:
    headers = {"x-user": "u1", "cookie": "a=1; session=abc; b=2"}
    assert HashPolicy.of({"http_header_name": "X-User"}).key(headers) == "u1"
    assert HashPolicy.of({"http_cookie": {"name": "session", "ttl_ms": 0}}).key(headers) == "abc"
    assert HashPolicy.of({"http_cookie": {"name": "missing"}}).key(headers) is None
    assert HashPolicy.of({"http_query_parameter_name": "s"}).key(headers, query={"s": "q1"}) == "q1"
    assert HashPolicy.of({"use_source_ip": True}).key(headers, "10.1.2.3") == "10.1.2.3"
    assert HashPolicy.of({"minimum_ring_size": 10}).key(headers, "10.1.2.3") is None


def test_consistent_hash_from_a_translated_destination_rule() -> None:
    res = resources(dr("reviews", "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n"
                                  "      consistentHash: {httpHeaderName: x-user}\n"))
    cfg = config(res)
    clusters = build_clusters(cfg, rng=random.Random(0))
    reviews = clusters[f"outbound|9080||{host('reviews')}"]
    assert reviews.policy == "RING_HASH" and len(reviews.endpoints) == 3
    assert reviews.hash_policy is not None
    key = reviews.hash_policy.key({"x-user": "jason"})
    assert len({reviews.pick(key).key for _ in range(100)}) == 1


def test_stable_hash_is_fixed_and_spreads() -> None:
    assert stable_hash("") == 0 and stable_hash("user-1") == stable_hash("user-1")
    buckets = Counter(stable_hash(f"k{i}") % 16 for i in range(16_000))
    assert all(850 <= c <= 1150 for c in buckets.values())


# --- outlier detection ---------------------------------------------------------------------------


def test_ejected_after_consecutive_5xx_and_back_after_the_ejection_time() -> None:
    c = make(4, od=OD)
    ep = c.endpoints[0]
    assert fail(c, ep, 2) == [False, False]
    c.start(ep)
    c.finish(ep, 0, status=200)  # a success resets the count
    assert fail(c, ep, 2) == [False, False]
    assert fail(c, ep, 1, now=1_000) == [True]
    assert ep.ejected and ep.ejections == 1 and ep.ejected_until == 31_000
    assert ep not in picks_endpoints(c, 2_000) and len(c.available) == 3
    assert c.tick(30_999) == [] and ep.ejected
    assert c.tick(31_000) == [ep] and not ep.ejected
    assert ep in picks_endpoints(c, 2_000)
    # counters start over after a return: it takes three more errors
    assert fail(c, ep, 3, now=40_000) == [False, False, True]


def picks_endpoints(cluster: Cluster, n: int) -> set[Endpoint | None]:
    return {cluster.pick() for _ in range(n)}


def test_connect_failures_and_timeouts_count_as_gateway_errors() -> None:
    c = make(4, od=OD | {"consecutive_5xx_errors": 0, "consecutive_gateway_errors": 2})
    ep = c.endpoints[1]
    c.start(ep)
    assert not c.finish(ep, 0, status=500)  # a 5xx that is not a gateway error
    c.start(ep)
    assert not c.finish(ep, 0, failure=CONNECT_FAILURE)
    c.start(ep)
    assert c.finish(ep, 0, failure=TIMEOUT)
    assert ep.connect_failures == 1 and ep.errors == 3 and ep.requests == 3 and ep.active == 0
    # a try the caller abandoned teaches nothing
    other = c.endpoints[2]
    fail(c, other, 1)
    c.start(other)
    assert not c.finish(other, 0)
    assert other.consecutive_gateway == 1


def test_ejection_time_grows_with_repeated_ejections_and_decays_when_healthy() -> None:
    c = make(4, od=OD | {"consecutive_5xx_errors": 1})
    ep = c.endpoints[0]
    now = 0.0
    durations = []
    for _ in range(4):
        fail(c, ep, 1, now)
        assert ep.ejected_until is not None
        durations.append(ep.ejected_until - now)
        now = ep.ejected_until
        c.tick(now)  # back, and fails again at once
    assert durations == [30_000, 60_000, 90_000, 120_000]
    # after a long healthy stretch (10 intervals), the multiplier is spent: back to the base time
    fail(c, ep, 1, now + 100_000)
    assert ep.ejected_until == now + 130_000 and ep.ejections == 5


def test_ejection_time_is_capped_at_envoys_maximum() -> None:
    c = make(4, od=OD | {"consecutive_5xx_errors": 1, "base_ejection_time_ms": 120_000})
    ep = c.endpoints[0]
    now = 0.0
    durations = []
    for _ in range(4):
        fail(c, ep, 1, now)
        assert ep.ejected_until is not None
        durations.append(ep.ejected_until - now)
        now = ep.ejected_until
        c.tick(now)
    assert durations == [120_000, 240_000, MAX_EJECTION_TIME_MS, MAX_EJECTION_TIME_MS]


@pytest.mark.parametrize(("n", "percent", "ejectable"),
                         [(10, 20, 2), (10, 25, 3), (3, 10, 1), (4, 50, 2), (4, 100, 4)])
def test_max_ejection_percent_bounds_ejections(n: int, percent: int, ejectable: int) -> None:
    c = make(n, od=OD | {"consecutive_5xx_errors": 1, "max_ejection_percent": percent})
    results = [fail(c, ep, 1)[0] for ep in c.endpoints]
    assert sum(results) == ejectable
    assert sum(ep.ejected for ep in c.endpoints) == ejectable


def test_a_refused_ejection_fires_again_only_after_the_count_restarts() -> None:
    c = make(2, od=OD | {"consecutive_5xx_errors": 2, "max_ejection_percent": 50})
    a, b = c.endpoints
    assert fail(c, a, 2) == [False, True]
    assert fail(c, b, 4) == [False, False, False, False]  # at the cap; the threshold fired once
    c.tick(30_000)
    fail(c, b, 1)
    c.start(b)
    c.finish(b, 30_000, status=200)
    assert fail(c, b, 2, now=30_000) == [False, True]


def test_ejections_off_without_thresholds() -> None:
    c = make(3, od=OD | {"consecutive_5xx_errors": 0})
    assert fail(c, c.endpoints[0], 50) == [False] * 50
    plain = make(3)
    assert fail(plain, plain.endpoints[0], 50) == [False] * 50
    assert plain.endpoints[0].errors == 50


# --- panic mode ------------------------------------------------------------------------------------


def test_panic_mode_without_outlier_detection_spreads_over_every_endpoint_below_50_percent() -> None:
    half = make(endpoints=[*endpoint_specs(2), *[{**e, "healthy": False} for e in endpoint_specs(4)[2:]]])
    assert not half.panic  # 50% healthy is not below the threshold
    assert {e.key for e in picks_endpoints(half, 1_000)} == {"10.0.0.0:8080", "10.0.0.1:8080"}
    specs = endpoint_specs(4)
    for e in specs[1:]:
        e["healthy"] = False
    quarter = make(endpoints=specs)
    assert quarter.panic and len(picks_endpoints(quarter, 2_000)) == 4
    assert quarter.state()["panic"] is True


def test_panic_threshold_is_min_health_percent_with_outlier_detection() -> None:
    # Istio's default min_health_percent 0: no panic, so with everything ejected there is no host
    c = make(2, od=OD | {"consecutive_5xx_errors": 1})
    for ep in c.endpoints:
        fail(c, ep, 1)
    assert not c.panic and c.pick() is None
    c.tick(30_000)
    assert c.pick() is not None
    # min_health_percent 60 with 1 of 2 ejected: below the threshold, so traffic goes everywhere
    c = make(2, od=OD | {"consecutive_5xx_errors": 1, "min_health_percent": 60})
    fail(c, c.endpoints[0], 1)
    assert c.panic and len(picks_endpoints(c, 1_000)) == 2


def test_no_endpoints_and_original_destination_clusters() -> None:
    empty = make(0)
    assert empty.pick() is None and not empty.panic
    cfg = config([])
    clusters = build_clusters(cfg)
    passthrough, blackhole = clusters["PassthroughCluster"], clusters["BlackHoleCluster"]
    assert passthrough.original_destination and passthrough.pick() is None
    assert not blackhole.original_destination and blackhole.pick() is None
    assert make(2, {"simple": "PASSTHROUGH"}).original_destination


def test_retries_avoid_hosts_already_tried_when_they_can() -> None:
    c = make(3, {"simple": "RANDOM"})
    tried: list[Endpoint] = []
    for _ in range(3):
        ep = c.pick(avoid=tried)
        assert ep is not None and ep not in tried
        tried.append(ep)
    only = make(1)
    assert only.pick(avoid=only.endpoints) is only.endpoints[0]  # better the same host than none


# --- connection pool -------------------------------------------------------------------------------


def test_connection_pool_budgets_overflow_and_release() -> None:
    pool = ConnectionPool({"tcp": {"connect_timeout_ms": 250, "max_connections": 2},
                           "http": {"http1_max_pending_requests": 1, "max_requests_per_connection": 2,
                                    "max_retries": 1}})
    assert pool.connect_timeout_ms == 250
    assert [pool.connections.try_acquire() for _ in range(3)] == [True, True, False]
    assert pool.connections.overflows == 1
    pool.connections.release()
    assert pool.connections.try_acquire()
    assert pool.pending.try_acquire() and not pool.pending.try_acquire()
    assert pool.retries.try_acquire() and not pool.retries.try_acquire()
    assert pool.requests.limit == UNLIMITED and pool.requests.try_acquire()
    assert [pool.reusable(n) for n in (0, 1, 2)] == [True, True, False]
    assert ConnectionPool(None).reusable(10**6) and ConnectionPool(None).connect_timeout_ms == 10_000
    assert pool.state()["pending"] == {"limit": 1, "active": 1, "overflows": 1}


def test_connection_pool_from_a_translated_destination_rule() -> None:
    res = resources(dr("reviews", """  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 2, maxRequestsPerConnection: 1, maxRetries: 3}
"""))
    reviews = build_clusters(config(res))[f"outbound|9080||{host('reviews')}"]
    pool = reviews.pool
    assert (pool.connections.limit, pool.pending.limit, pool.retries.limit) == (1, 2, 3)
    assert pool.connections.try_acquire() and not pool.connections.try_acquire()
    assert not pool.reusable(1)


# --- bookinfo, end to end --------------------------------------------------------------------------


def test_bookinfo_route_then_cluster_then_endpoint(istio_testdata: Path) -> None:
    b = istio_testdata / "bookinfo"
    cfg = config(files(b / "virtual-service-reviews-80-20.yaml", b / "destination-rule-all.yaml"))
    routes = build_route_configs(cfg)["9080"]
    rng = random.Random(11)
    clusters = build_clusters(cfg, rng=rng)
    route = routes.match(Request("GET", "/reviews/0", "reviews:9080"))
    assert route is not None
    hits: Counter[str] = Counter()
    for _ in range(10_000):
        ep = clusters[route.pick_cluster(rng.random()).name].pick()
        assert ep is not None
        hits[ep.labels["version"]] += 1
    assert set(hits) == {"v1", "v2"} and 7840 <= hits["v1"] <= 8160
    _, endpoints = bookinfo()
    v1 = next(e for e in endpoints if e.labels == {"app": "reviews", "version": "v1"})
    assert clusters[f"outbound|9080|v1|{host('reviews')}"].endpoints[0].address == v1.address


# --- config swaps ----------------------------------------------------------------------------------


def test_state_survives_a_config_swap() -> None:
    old = make(3, od=OD | {"consecutive_5xx_errors": 1}, lb={"simple": "ROUND_ROBIN"},
               connection_pool={"tcp": {"max_connections": 5}})
    kept, dropped, busy = old.endpoints
    fail(old, kept, 1, now=0)
    old.start(busy)
    assert old.pool.connections.try_acquire()
    # the new config drops one endpoint, adds one, changes a weight and the pool limit
    specs = [e for e in endpoint_specs(3) if e["address"] != dropped.address] + endpoint_specs(4)[3:]
    specs[0]["weight"] = 3
    new = make(endpoints=specs, previous=old, od=OD | {"consecutive_5xx_errors": 1},
               lb={"simple": "ROUND_ROBIN"}, connection_pool={"tcp": {"max_connections": 1}})
    assert new.endpoints[0] is kept and kept.ejected and kept.ejections == 1 and kept.weight == 3
    assert new.endpoints[1] is busy and busy.active == 1 and busy.requests == 1
    assert dropped not in new.endpoints and new.endpoints[2].key == "10.0.0.3:8080"
    assert kept not in picks_endpoints(new, 100)
    assert new.pool.connections is old.pool.connections
    assert new.pool.connections.active == 1 and not new.pool.connections.try_acquire()  # new limit 1
    # a request started before the swap finishes on the new cluster
    new.finish(busy, 5, status=200)
    assert busy.active == 0
    assert new.tick(30_000) == [kept] and kept in picks_endpoints(new, 100)
    # ejection history carries on: the next ejection is the second
    fail(new, kept, 1, now=30_000)
    assert kept.ejected_until == 30_000 + 60_000


def test_a_swap_without_outlier_detection_forgets_ejections() -> None:
    old = make(3, od=OD | {"consecutive_5xx_errors": 1})
    fail(old, old.endpoints[0], 1)
    new = make(3, previous=old)
    assert not new.endpoints[0].ejected and len(new.available) == 3


def test_hash_tables_are_kept_when_the_endpoint_set_is_unchanged() -> None:
    lb = {"consistent_hash": {"http_header_name": "x", "maglev_table_size": 65537}}
    old = make(3, lb)
    same = make(3, lb, previous=old)
    assert same._lb is old._lb
    assert make(4, lb, previous=old)._lb is not old._lb
    assert make(3, {"consistent_hash": {"http_header_name": "x"}}, previous=old)._lb is not old._lb


def test_build_clusters_carries_every_cluster_over(istio_testdata: Path) -> None:
    cfg = config(files(istio_testdata / "bookinfo" / "destination-rule-all.yaml"))
    first = build_clusters(cfg, rng=random.Random(0))
    name = f"outbound|9080|v2|{host('reviews')}"
    ep = first[name].endpoints[0]
    first[name].start(ep)
    second = build_clusters(cfg, first, rng=random.Random(0))
    assert set(second) == set(first) == set(cfg["clusters"])
    assert second[name].endpoints[0] is ep and ep.active == 1


def test_admin_state_lists_endpoints_with_their_counters() -> None:
    c = make(2, od=OD | {"consecutive_5xx_errors": 1}, lb={"simple": "ROUND_ROBIN"})
    a, b = c.endpoints
    fail(c, a, 1, now=0)
    c.start(b)
    state = c.state()
    assert state["name"] == "c" and state["lb"] == "ROUND_ROBIN" and state["healthy_endpoints"] == 1
    assert state["endpoints"] == [
        {"address": "10.0.0.0", "port": 8080, "weight": 1, "locality": "", "healthy": True, "ejected": True,
         "ejections": 1, "active_requests": 0, "requests_total": 1, "errors_total": 1,
         "connect_failures_total": 0},
        {"address": "10.0.0.1", "port": 8080, "weight": 1, "locality": "", "healthy": True, "ejected": False,
         "ejections": 0, "active_requests": 1, "requests_total": 1, "errors_total": 0,
         "connect_failures_total": 0}]
    assert set(state["circuit_breakers"]) == {"connections", "pending", "requests", "retries"}
