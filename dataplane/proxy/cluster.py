"""Upstream clusters for the sidecar: endpoints, load balancing, outlier detection and
connection-pool limits, as Envoy runs them for Istio's DestinationRules (sans IO).

`build_clusters(config, previous)` makes a `Cluster` for every cluster of a proxy config
(schema in controlplane.pilot.networking). The proxy asks a cluster to `pick` an endpoint,
brackets each try with `start` / `finish` (which feeds least-request balancing and outlier
detection), and calls `tick(now_ms)` now and then to bring ejected endpoints back. Time is
always an argument (milliseconds, any monotonic origin) and randomness comes from the
`random.Random` the clusters are built with, so every decision here is reproducible.

Load-balancing structures are built when the endpoint set or its health changes, never per
pick: a pick is an index, two random indexes (least request), or a hash and a bisect
(consistent hash). A config swap keeps the state of endpoints that survive it (ejections,
counters, active requests) and of connection-pool budgets, so an update resets nothing.
"""

from __future__ import annotations

import heapq
import random
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Container, Mapping
from typing import Any, NamedTuple, cast

# Why a try got no response; `retry_on` names the first three the same way.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
REFUSED_STREAM = "refused-stream"
TIMEOUT = "timeout"
# How outlier detection counts them: as the 503/504 the proxy answers in their place (Envoy
# does the same while local-origin errors are not split from the upstream's own).
FAILURE_STATUS = {CONNECT_FAILURE: 503, RESET: 503, REFUSED_STREAM: 503, TIMEOUT: 504}
GATEWAY_ERRORS = frozenset({502, 503, 504})

UNLIMITED = 2**32 - 1  # Istio's circuit-breaker defaults: no limit in practice
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
DEFAULT_PANIC_PERCENT = 50.0  # Envoy's healthy_panic_threshold when Istio sets none
MAX_EJECTION_TIME_MS = 300_000  # Envoy's default max_ejection_time (Istio leaves it)
DEFAULT_RING_SIZE = 1024  # Istio's default minimumRingSize
MAX_RING_SIZE = 8 * 1024 * 1024  # Envoy's maximum_ring_size
HOST_SELECTION_ATTEMPTS = 5  # Istio's retry host predicate: up to 5 picks avoiding earlier hosts
MASK32 = 0xFFFFFFFF


def stable_hash(key: str) -> int:
    """A 32-bit hash that every process computes alike (Python's str hash is salted per process),
    so every sidecar sends a key to the same endpoint: CRC-32 (fast, in C) through murmur3's
    finalizer, which spreads similar keys evenly; blake2b would cost about twice as much."""
    return mix32(zlib.crc32(key.encode()))


def mix32(x: int) -> int:
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


class Endpoint:
    """One upstream address with its load-balancing, outlier and admin state."""

    __slots__ = ("active", "address", "backoff", "connect_failures", "consecutive_5xx", "consecutive_gateway",
                 "ejected_until", "ejections", "errors", "healthy", "key", "labels", "locality", "port",
                 "requests", "service_account", "tls_mode", "unejected_at", "weight")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.address: str = spec["address"]
        self.port: int = spec["port"]
        self.key = f"{self.address}:{self.port}"
        self.active = self.requests = self.errors = self.connect_failures = 0
        self.consecutive_5xx = self.consecutive_gateway = 0
        self.ejections = self.backoff = 0  # times ejected; Envoy's ejection-time multiplier
        self.ejected_until: float | None = None
        self.unejected_at: float | None = None
        self.update(spec)

    def update(self, spec: Mapping[str, Any]) -> None:
        """Take what EDS may change about a surviving endpoint."""
        self.weight: int = max(1, spec.get("weight", 1))
        self.healthy: bool = spec.get("healthy", True)
        self.locality: str = spec.get("locality", "")
        self.labels: dict[str, str] = spec.get("labels") or {}
        self.service_account: str = spec.get("service_account", "")
        self.tls_mode: str = spec.get("tls_mode", "disabled")

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def forget_ejection(self) -> None:
        self.ejected_until = self.unejected_at = None
        self.backoff = self.consecutive_5xx = self.consecutive_gateway = 0

    def state(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "weight": self.weight, "locality": self.locality,
                "healthy": self.healthy, "ejected": self.ejected, "ejections": self.ejections,
                "active_requests": self.active, "requests_total": self.requests, "errors_total": self.errors,
                "connect_failures_total": self.connect_failures}


class Budget:
    """One circuit breaker: at most `limit` at a time; refusals are counted as overflows."""

    __slots__ = ("active", "limit", "overflows")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or UNLIMITED
        self.active = self.overflows = 0

    @classmethod
    def reuse(cls, budget: Budget | None, limit: int | None) -> Budget:
        if budget is None:
            return cls(limit)
        budget.limit = limit or UNLIMITED
        return budget

    def try_acquire(self) -> bool:
        """False means overflow: the proxy answers 503 with the UO flag instead of waiting."""
        if self.active >= self.limit:
            self.overflows += 1
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1

    def state(self) -> dict[str, int]:
        return {"limit": self.limit, "active": self.active, "overflows": self.overflows}


class ConnectionPool:
    """Istio's connectionPool as Envoy's circuit breakers: connections, pending requests (waiting
    for a connection), active requests and concurrent retries, plus per-connection limits."""

    __slots__ = ("connect_timeout_ms", "connections", "max_requests_per_connection", "pending", "requests",
                 "retries")

    def __init__(self, spec: Mapping[str, Any] | None, previous: ConnectionPool | None = None) -> None:
        spec = spec or {}
        tcp, http = spec.get("tcp") or {}, spec.get("http") or {}
        self.connect_timeout_ms: int = tcp.get("connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS)
        self.max_requests_per_connection: int = http.get("max_requests_per_connection") or 0
        # A swap keeps the budgets themselves: what is in flight still counts, and is released,
        # against the new limits whichever cluster object the proxy releases it through.
        self.connections = Budget.reuse(previous and previous.connections, tcp.get("max_connections"))
        self.pending = Budget.reuse(previous and previous.pending, http.get("http1_max_pending_requests"))
        self.requests = Budget.reuse(previous and previous.requests, http.get("http2_max_requests"))
        self.retries = Budget.reuse(previous and previous.retries, http.get("max_retries"))

    def reusable(self, requests_served: int) -> bool:
        """Whether a connection that has carried `requests_served` requests may carry another."""
        limit = self.max_requests_per_connection
        return not limit or requests_served < limit

    def state(self) -> dict[str, Any]:
        return {"connections": self.connections.state(), "pending": self.pending.state(),
                "requests": self.requests.state(), "retries": self.retries.state()}


class OutlierDetection(NamedTuple):
    consecutive_5xx_errors: int
    consecutive_gateway_errors: int
    interval_ms: int
    base_ejection_time_ms: int
    max_ejection_percent: float
    min_health_percent: float

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None) -> OutlierDetection | None:
        if not spec:
            return None
        return cls(spec.get("consecutive_5xx_errors", 0), spec.get("consecutive_gateway_errors", 0),
                   spec.get("interval_ms", 10_000), spec.get("base_ejection_time_ms", 30_000),
                   spec.get("max_ejection_percent", 10), spec.get("min_health_percent", 0))


class HashPolicy(NamedTuple):
    """What a consistent-hash cluster hashes: kind is header, cookie, query or source_ip."""

    kind: str
    name: str

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> HashPolicy:
        if spec.get("http_header_name"):
            return cls("header", spec["http_header_name"].lower())
        if spec.get("http_cookie"):
            return cls("cookie", spec["http_cookie"]["name"])
        if spec.get("http_query_parameter_name"):
            return cls("query", spec["http_query_parameter_name"])
        return cls("source_ip" if spec.get("use_source_ip") else "none", "")

    def key(self, headers: Mapping[str, str], source_ip: str = "",
            query: Mapping[str, str] | None = None) -> str | None:
        """The request's hash key; None (nothing to hash) makes the pick random, as in Envoy."""
        if self.kind == "header":
            return headers.get(self.name)
        if self.kind == "cookie":
            for pair in headers.get("cookie", "").split(";"):
                name, _, value = pair.strip().partition("=")
                if name == self.name:
                    return value
            return None
        if self.kind == "query":
            return (query or {}).get(self.name)
        return (source_ip or None) if self.kind == "source_ip" else None


# --- load balancers: pick(key, attempt) over what Cluster gives them -------------------------


def weighted(hosts: list[Endpoint]) -> bool:
    """Whether weights differ; equal weights take the plain (faster) pick."""
    return len({h.weight for h in hosts}) > 1


def cumulative_weights(hosts: list[Endpoint]) -> list[float] | None:
    """Cumulative weights normalised to 1, or None when all weights are equal (uniform picks)."""
    if not weighted(hosts):
        return None
    total = sum(h.weight for h in hosts)
    out, running = [], 0
    for h in hosts:
        running += h.weight
        out.append(running / total)
    return out


class RoundRobin:
    """Envoy's round robin: in turn when weights are equal, else earliest deadline first (each
    endpoint's next turn 1/weight after its last), which spreads a heavy endpoint's turns out."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._hosts: list[Endpoint] = []
        self._next = 0
        self._edf: list[tuple[float, int, Endpoint]] | None = None

    def update(self, hosts: list[Endpoint]) -> None:
        self._hosts = hosts
        self._next = self._rng.randrange(len(hosts)) if hosts else 0  # proxies do not all start alike
        self._edf = [(1 / h.weight, i, h) for i, h in enumerate(hosts)] if weighted(hosts) else None
        if self._edf:
            heapq.heapify(self._edf)

    def pick(self, key: str | None, attempt: int) -> Endpoint | None:
        if self._edf is not None:
            deadline, i, host = self._edf[0]
            heapq.heapreplace(self._edf, (deadline + 1 / host.weight, i, host))
            return host
        hosts = self._hosts
        if not hosts:
            return None
        i = self._next
        self._next = i + 1
        return hosts[i % len(hosts)]


class RandomPick:
    """Uniform, or in proportion to weight when weights differ."""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random
        self._hosts: list[Endpoint] = []
        self._cumulative: list[float] | None = None

    def update(self, hosts: list[Endpoint]) -> None:
        self._hosts = hosts
        self._cumulative = cumulative_weights(hosts)

    def _one(self) -> Endpoint:
        if self._cumulative is None:
            return self._hosts[int(self._random() * len(self._hosts))]
        return self._hosts[bisect_right(self._cumulative, self._random())]

    def pick(self, key: str | None, attempt: int) -> Endpoint | None:
        return self._one() if self._hosts else None


class LeastRequest(RandomPick):
    """Power of two choices: of two random endpoints (drawn by weight), the one with fewer active
    requests; this tracks load almost as well as a full scan at the cost of two draws."""

    def pick(self, key: str | None, attempt: int) -> Endpoint | None:
        hosts = self._hosts
        n = len(hosts)
        if n < 2:
            return hosts[0] if hosts else None
        if self._cumulative is None:  # inline: this is the default policy's hot path
            a, b = hosts[int(self._random() * n)], hosts[int(self._random() * n)]
        else:
            a, b = self._one(), self._one()
        return b if b.active < a.active else a


class HashTable:
    """Consistent hashing over a cluster's endpoint set, built once per set (not per health change):
    a key lands on a slot and walks forward to the first available endpoint, so keys of an
    unavailable endpoint spread over the others and come back with it.

    Ring hash (Envoy's default for Istio): each endpoint owns points on a 32-bit ring in proportion
    to its weight; a key goes to the next point. Maglev: a lookup table where each endpoint fills
    slots from its own permutation in turns, for a more even spread and an O(1) lookup."""

    def __init__(self, endpoints: list[Endpoint], spec: Mapping[str, Any], rng: random.Random) -> None:
        self._rng = rng
        self.shape = self.shape_of(endpoints, spec)
        self.maglev = bool(spec.get("maglev_table_size"))
        self.any_available = self.all_available = False
        self._points: list[int] = []
        self._slots: list[Endpoint] = []
        # Ring lookups bisect only between the points of the key's bucket of the hash space (about
        # one): a full bisect touches a dozen scattered ints, which is what costs with many rings.
        self._bucket_shift = 32
        self._bucket_start = array("I", [0, 0])
        if endpoints:
            if self.maglev:
                self._slots = maglev_table(endpoints, spec["maglev_table_size"])
            else:
                minimum = spec.get("minimum_ring_size") or DEFAULT_RING_SIZE
                self._points, self._slots = ring(endpoints, minimum)
                bits = max(1, (len(self._points) - 1).bit_length())
                self._bucket_shift = 32 - bits
                self._bucket_start = array("I", [bisect_left(self._points, b << self._bucket_shift)
                                                 for b in range((1 << bits) + 1)])

    @staticmethod
    def shape_of(endpoints: list[Endpoint], spec: Mapping[str, Any]) -> tuple[Any, ...]:
        """All a table depends on: equal shapes, equal tables (so a config swap can keep it)."""
        return (tuple((e.key, e.weight) for e in endpoints), spec.get("maglev_table_size"),
                spec.get("minimum_ring_size"))

    def update(self, hosts: list[Endpoint]) -> None:
        self.any_available = bool(hosts)
        self.all_available = len(hosts) == len(self.shape[0])

    def pick(self, key: str | None, attempt: int) -> Endpoint | None:
        slots = self._slots
        if not self.any_available:
            return None
        h = stable_hash(key) if key is not None else self._rng.getrandbits(32)
        n = len(slots)
        if self.maglev:
            i = h % n
        else:
            b = h >> self._bucket_shift
            i = bisect_left(self._points, h, self._bucket_start[b], self._bucket_start[b + 1]) % n
        i += attempt  # a retry avoiding an earlier host looks further along, as Envoy's ring does
        if self.all_available:
            return slots[i % n]
        for step in range(n):
            e = slots[(i + step) % n]
            if e.healthy and e.ejected_until is None:
                return e
        return None


def ring(endpoints: list[Endpoint], minimum_size: int) -> tuple[list[int], list[Endpoint]]:
    """Envoy's ring: points hashed from "<address>:<port>_<i>", sorted, at least `minimum_size`
    of them. Unlike Envoy, points per unit of weight are a power of two, so adding or removing an
    endpoint seldom changes how many points the others have, and moves only its own keys."""
    total = sum(e.weight for e in endpoints)
    per_weight = 1 << (-(-minimum_size // total) - 1).bit_length()  # ceil(minimum/total) up to a power of 2
    per_weight = max(1, min(per_weight, MAX_RING_SIZE // total))
    # Each point packed as one int, hash above the endpoint's index, so the sort compares ints, not
    # tuples; CRC-32 continues from the shared "<key>_" prefix (equal to hashing the whole string).
    bits = len(endpoints).bit_length()
    packed = []
    for index, e in enumerate(endpoints):
        prefix = zlib.crc32(f"{e.key}_".encode())
        packed += [mix32(zlib.crc32(b"%d" % i, prefix)) << bits | index for i in range(per_weight * e.weight)]
    packed.sort()
    mask = (1 << bits) - 1
    return [p >> bits for p in packed], [endpoints[p & mask] for p in packed]


def maglev_table(endpoints: list[Endpoint], size: int) -> list[Endpoint]:
    """Maglev's population: in turns, each endpoint takes its next free slot along its own
    permutation (offset + k·skip); heavier endpoints earn turns faster. `size` should be prime."""
    if len(endpoints) == 1:
        return endpoints * size
    slots = [stable_hash(e.key + "#offset") % size for e in endpoints]  # each one's next candidate
    skips = [stable_hash(e.key + "#skip") % (size - 1) + 1 for e in endpoints]
    top = max(e.weight for e in endpoints)
    shares = [e.weight / top for e in endpoints]
    credit = [0.0] * len(endpoints)
    table: list[Endpoint | None] = [None] * size
    filled = 0
    while True:
        for i, e in enumerate(endpoints):
            credit[i] += shares[i]
            if credit[i] < 1:
                continue
            credit[i] -= 1
            slot, skip = slots[i], skips[i]
            while table[slot] is not None:
                slot = (slot + skip) % size
            table[slot] = e
            slots[i] = (slot + skip) % size
            filled += 1
            if filled == size:
                return cast(list[Endpoint], table)  # every slot is filled


# --- clusters ----------------------------------------------------------------------------------


class Cluster:
    """One upstream cluster. `previous` is the cluster of the same name from the config being
    replaced: its surviving endpoints (by address:port) keep their state, and so do its budgets."""

    def __init__(self, spec: Mapping[str, Any], endpoints: list[Mapping[str, Any]],
                 previous: Cluster | None = None, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.type: str = spec.get("type", "EDS")
        self.rng = rng or random.Random()
        lb = spec.get("lb") or {}
        hashing = lb.get("consistent_hash")
        if hashing:
            self.policy: str = "MAGLEV" if hashing.get("maglev_table_size") else "RING_HASH"
        else:
            self.policy = lb.get("simple", "LEAST_REQUEST")
        # Istio's PASSTHROUGH load balancer and ORIGINAL_DST clusters go where the caller was going.
        self.original_destination = self.type == "ORIGINAL_DST" or self.policy == "PASSTHROUGH"
        self.outlier = OutlierDetection.of(spec.get("outlier_detection"))
        # Istio turns minHealthPercent into Envoy's panic threshold; without it Envoy's 50% holds.
        self.panic_percent = float(self.outlier.min_health_percent) if self.outlier else DEFAULT_PANIC_PERCENT
        self.hash_policy = HashPolicy.of(hashing) if hashing else None
        self.pool = ConnectionPool(spec.get("connection_pool"), previous.pool if previous else None)
        self.endpoints: list[Endpoint] = []
        self._by_key: dict[str, Endpoint] = {}
        old = previous._by_key if previous else {}
        for e in endpoints:
            key = f"{e['address']}:{e['port']}"
            if key in self._by_key:
                continue
            ep = old.get(key)
            if ep is None:
                ep = Endpoint(e)
            else:
                ep.update(e)
                if self.outlier is None:
                    ep.forget_ejection()
            self.endpoints.append(ep)
            self._by_key[key] = ep
        self._lb: RoundRobin | RandomPick | HashTable
        if hashing:
            table = previous._lb if previous else None
            if isinstance(table, HashTable) and table.shape == HashTable.shape_of(self.endpoints, hashing):
                self._lb = table
            else:
                self._lb = HashTable(self.endpoints, hashing, self.rng)
        elif self.policy == "ROUND_ROBIN":
            self._lb = RoundRobin(self.rng)
        elif self.policy == "RANDOM":
            self._lb = RandomPick(self.rng)
        else:
            self._lb = LeastRequest(self.rng)
        self.panic = False
        self.available: list[Endpoint] = []
        self.ejected = {e for e in self.endpoints if e.ejected_until is not None}
        self._refresh()

    def _refresh(self) -> None:
        """Recompute who takes traffic after any change of health or ejection."""
        self.available = [e for e in self.endpoints if e.healthy and e.ejected_until is None]
        total = len(self.endpoints)
        self.panic = total > 0 and 100 * len(self.available) / total < self.panic_percent
        self._lb.update(list(self.endpoints) if self.panic else self.available)

    def pick(self, hash_key: str | None = None, avoid: Container[Endpoint] = ()) -> Endpoint | None:
        """An endpoint for the next try, or None for no healthy upstream (a 503). `hash_key` is what
        `hash_policy.key` extracted; `avoid` holds hosts earlier tries used, which a retry skips
        when it can (Istio's previous-hosts predicate)."""
        ep = self._lb.pick(hash_key, 0)
        attempt = 1
        while ep is not None and ep in avoid and attempt < HOST_SELECTION_ATTEMPTS:
            ep = self._lb.pick(hash_key, attempt)
            attempt += 1
        return ep

    def start(self, ep: Endpoint) -> None:
        ep.active += 1
        ep.requests += 1

    def finish(self, ep: Endpoint, now_ms: float, status: int | None = None,
               failure: str | None = None) -> bool:
        """A try on `ep` ended with a response `status`, or with a `failure` (CONNECT_FAILURE...),
        or neither (the caller gave up: nothing learned). Returns whether it ejected `ep`. Report to
        the cluster now in force: `ep` is still its endpoint if it survived a swap."""
        ep.active -= 1
        if failure is not None:
            status = FAILURE_STATUS[failure]
            if failure == CONNECT_FAILURE:
                ep.connect_failures += 1
        if status is None:
            return False
        if status < 500:
            ep.consecutive_5xx = ep.consecutive_gateway = 0
            return False
        ep.errors += 1
        od = self.outlier
        if od is None or self._by_key.get(ep.key) is not ep:
            return False
        ep.consecutive_gateway = ep.consecutive_gateway + 1 if status in GATEWAY_ERRORS else 0
        ep.consecutive_5xx += 1
        # Equality, as in Envoy: a threshold fires once, until a success or a return resets it.
        if ep.ejected_until is None and (
                ep.consecutive_gateway == od.consecutive_gateway_errors > 0
                or ep.consecutive_5xx == od.consecutive_5xx_errors > 0):
            return self._eject(ep, now_ms)
        return False

    def _eject(self, ep: Endpoint, now_ms: float) -> bool:
        od = self.outlier
        assert od is not None
        if 100 * len(self.ejected) / len(self.endpoints) >= od.max_ejection_percent:
            return False
        if ep.unejected_at is not None and od.interval_ms > 0:
            # Envoy lowers the multiplier by one per interval the endpoint stayed in service.
            ep.backoff = max(0, ep.backoff - int((now_ms - ep.unejected_at) // od.interval_ms))
        if od.base_ejection_time_ms * ep.backoff < MAX_EJECTION_TIME_MS:
            ep.backoff += 1
        ep.ejected_until = now_ms + min(od.base_ejection_time_ms * ep.backoff, MAX_EJECTION_TIME_MS)
        ep.ejections += 1
        self.ejected.add(ep)
        self._refresh()
        return True

    def tick(self, now_ms: float) -> list[Endpoint]:
        """Return to service the endpoints whose ejection time is over; returns them (in endpoint
        order). Costs nothing while no endpoint is ejected, so the proxy can tick every cluster."""
        if not self.ejected:
            return []
        back = [e for e in self.endpoints if e.ejected_until is not None and now_ms >= e.ejected_until]
        for e in back:
            self.ejected.discard(e)
            e.ejected_until = None
            e.unejected_at = now_ms
            e.consecutive_5xx = e.consecutive_gateway = 0
        if back:
            self._refresh()
        return back

    def state(self) -> dict[str, Any]:
        """What the admin /clusters endpoint shows for this cluster."""
        return {"name": self.name, "type": self.type, "lb": self.policy, "panic": self.panic,
                "healthy_endpoints": len(self.available), "circuit_breakers": self.pool.state(),
                "endpoints": [e.state() for e in self.endpoints]}


def build_clusters(config: Mapping[str, Any], previous: Mapping[str, Cluster] | None = None,
                   rng: random.Random | None = None) -> dict[str, Cluster]:
    """Every cluster of a proxy config, carrying over from `previous` (the clusters of the config
    being replaced) what survives: endpoint state, budgets, consistent-hash tables."""
    rng = rng or random.Random()
    endpoints = config.get("endpoints") or {}
    previous = previous or {}
    return {name: Cluster(spec, endpoints.get(name) or [], previous.get(name), rng)
            for name, spec in (config.get("clusters") or {}).items()}
