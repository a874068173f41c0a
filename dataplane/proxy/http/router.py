"""Envoy's router for one request, sans-IO: which route (and so which `Plan`), then for a route
with more than a cluster, what it decides (direct response, redirect, the weighted pick,
rewrites, header operations, fault injection). The shell (server.py) does the I/O: it forwards
a `Forward` or answers a `LocalReply`.

A `Plan` is what a route (or an inbound cluster) decides for every request, computed once per
route per config: a request to a `simple` plan skips `decide` altogether.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from dataplane.proxy import routing
from dataplane.proxy.cluster import Cluster
from dataplane.proxy.flags import FI
from dataplane.proxy.http.codec import Request
from dataplane.proxy.http.exchange import LocalReply
from dataplane.proxy.routing import HeaderOps
from dataplane.proxy.stats import Key

FAULT_ABORT = b"fault filter abort"  # Envoy's local reply body


class HeaderView(Mapping[str, str]):
    """A request's fields as routing reads them (str names, repeated values joined with ","),
    built on first use: most routes never look at a header."""

    __slots__ = ("_fields", "_map")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self._fields = fields
        self._map: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        m = self._map
        if m is None:
            m = self._map = {}
            for name, value in self._fields:
                k = name.decode("latin-1")
                v = value.decode("latin-1")
                m[k] = f"{m[k]},{v}" if k in m else v
        return m

    def __getitem__(self, name: str) -> str:
        return self._dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def get(self, name: str, default: Any = None) -> Any:
        return self._dict().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._dict()


class Plan:
    """What a route (or an inbound cluster) decides for every request, computed once per config.

    `simple`: no redirect, direct response, fault, mirror, rewrite, header operation or weighted
    split, so the request goes to `cluster` untouched (but for retries and timeouts). `ops` maps
    a weighted cluster to its request and response header operations composed with the route's.
    """

    __slots__ = ("at_end", "cluster", "direct", "fault", "keys", "mirrors", "name", "ops", "plain",
                 "redirect", "req_ops", "resp_ops", "retry", "retry_min", "rewrite", "route", "simple",
                 "target", "target_key", "timeout", "try_timeout")

    def __init__(self, route: routing.Route | None, cluster: str | None, name: str) -> None:
        self.route = route
        self.name = name
        self.keys: dict[str, Key] = {}
        self.ops: dict[str, tuple[HeaderOps | None, HeaderOps | None]] = {}
        # a simple plan's cluster, resolved on first use (plans live as long as their snapshot)
        self.target: Cluster | None = None
        self.target_key: Key | None = None
        self.plain = False  # the target needs no hash key and is no passthrough
        if route is None:
            self.cluster = cluster
            self.redirect = self.direct = self.fault = self.rewrite = self.retry = None
            self.req_ops = self.resp_ops = None
            self.mirrors: tuple[routing.Mirror, ...] = ()
            self.timeout = self.try_timeout = 0.0
            self.retry_min = 600
            self.simple = True
            self.at_end = False
            return
        self.redirect = route.redirect
        self.direct = route.direct_response
        self.fault = route.fault
        self.mirrors = route.mirrors
        self.rewrite = route.rewrite
        self.retry = retry = route.retry
        self.timeout = route.timeout_ms / 1000
        self.try_timeout = retry.per_try_timeout_ms / 1000 if retry is not None else 0.0
        # the lowest status worth asking the policy about: a 200 then costs one comparison
        self.retry_min = 600 if retry is None else next(
            (s for s in range(100, 600) if retry.should_retry(0, s)), 600)
        self.req_ops = route.request_headers or None
        self.resp_ops = route.response_headers or None
        for wc in route.clusters:
            if wc.request_headers or wc.response_headers:
                self.ops[wc.name] = (HeaderOps.then(wc.request_headers, self.req_ops),
                                     HeaderOps.then(wc.response_headers, self.resp_ops))
        self.cluster = route.clusters[0].name if len(route.clusters) == 1 else None
        self.simple = not (self.redirect or self.direct or self.fault or self.mirrors or self.rewrite
                           or self.req_ops or self.resp_ops or self.ops or self.cluster is None)
        self.at_end = bool(self.timeout or self.try_timeout or self.mirrors)  # work at the request's end


class Forward(NamedTuple):
    """Where and how a request goes: the cluster's name, the path and authority after rewrites,
    the header operations for the request and its response, the fault delay to wait first, and
    the fault abort to answer after that delay instead of forwarding (Envoy: delay, then abort)."""

    cluster: str
    path: bytes
    authority: bytes
    req_ops: HeaderOps | None
    resp_ops: HeaderOps | None
    delay_ms: int = 0
    abort: LocalReply | None = None


def routing_request(req: Request, authority: bytes) -> routing.Request:
    """The request as the route matchers read it (str fields)."""
    return routing.Request(req.method.decode("latin-1"), req.target.decode("latin-1"),
                           authority.decode("latin-1"), HeaderView(req.headers))


def decide(plan: Plan, req: Request, authority: bytes, rng: Any,
           clusters: Mapping[str, Cluster]) -> Forward | LocalReply:
    """The slow path of routing, for a plan that is not `simple`: direct responses, redirects, the
    weighted pick, rewrites, header operations and faults (random draws from `rng`, in that order)."""
    if plan.direct is not None:
        return LocalReply(plan.direct.status, plan.direct.body.encode(), route=plan.name)
    if plan.redirect is not None:
        location = plan.redirect.location(routing_request(req, authority))
        return LocalReply(plan.redirect.code, b"", (b"location: " + location.encode("latin-1"),),
                          route=plan.name)
    name = plan.route.pick_cluster(rng.random()).name  # type: ignore[union-attr]
    path = req.target
    if plan.rewrite is not None:
        path = plan.rewrite.path(path.decode("latin-1")).encode("latin-1")
        if plan.rewrite.authority:
            authority = plan.rewrite.authority.encode("latin-1")
    req_ops, resp_ops = plan.ops.get(name) or (plan.req_ops, plan.resp_ops)
    delay = 0
    abort = None
    if plan.fault is not None:
        fault = plan.fault.decide(rng.random(), rng.random())
        delay = fault.delay_ms
        if fault.http_status is not None:
            abort = LocalReply(fault.http_status, FAULT_ABORT, flags=(FI,), route=plan.name,
                               cluster=clusters.get(name))
        elif fault.grpc_status is not None:
            grpc = (b"content-type: application/grpc", b"grpc-status: %d" % fault.grpc_status,
                    b"grpc-message: fault filter abort")
            abort = LocalReply(200, b"", grpc, flags=(FI,), route=plan.name, cluster=clusters.get(name))
        if abort is not None and not delay:
            return abort
    return Forward(name, path, authority, req_ops, resp_ops, delay, abort)
