"""What the L7 connections of one runtime share (`HttpState`, kept as `runtime.http`): upstream
pools, per-route plans and stats keys rebuilt lazily after a config swap, the live connections
and their once-a-second sweep (idle keep-alive timeout, stalled bodies, draining); and Envoy's
x-request-id generator."""

from __future__ import annotations

import itertools
import os
import random
from typing import TYPE_CHECKING, Any

from dataplane.proxy import peer_metadata, routing
from dataplane.proxy.cluster import Cluster, Endpoint
from dataplane.proxy.http.router import Plan
from dataplane.proxy.http.upstream import Upstreams
from dataplane.proxy.reactor import Reactor, Timer
from dataplane.proxy.stats import DESTINATION, Key, Workload

if TYPE_CHECKING:
    from dataplane.proxy.http.server import HttpConnection

SWEEP_INTERVAL = 1.0
UNKNOWN_PEER = Workload()


class HttpState:
    """What the HttpConnections of one runtime share: upstream pools, per-route plans and stats
    keys (rebuilt lazily after a config swap), the live connections and their once-a-second sweep
    (idle keep-alive timeout, draining)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.reactor: Reactor = runtime.reactor
        self.upstreams = Upstreams(self.reactor, runtime.stats)
        self.connections: set[HttpConnection] = set()
        self.snapshot: Any = None
        self.plans: dict[Any, Plan] = {}
        self.keys: dict[tuple[str, str, str], Key] = {}
        self.original: dict[tuple[str, int], Endpoint] = {}
        self._sweeper: Timer | None = None
        self.peers = peer_metadata.PeerCache()  # metadata exchange: the peers seen so far
        self.md_local: Workload | None = None
        self.md_lines = b""
        self.md_fields: list[bytes] = []
        self.own_metadata()  # now: a proxy id unfit for a header fails the worker's start, not a request

    def own_metadata(self) -> bytes:
        """Our metadata exchange header lines (outbound requests to the mesh; `md_fields` for inbound
        replies), built once per Workload: a new connection picks up a changed one."""
        local = self.runtime.stats.local
        if local is not self.md_local:
            self.md_local = local
            self.md_lines = peer_metadata.header_lines(local, self.runtime.node_id)
            self.md_fields = self.md_lines[:-2].split(b"\r\n")
        return self.md_lines

    def swap(self, snapshot: Any) -> None:
        """A new config is in force: plans are rebuilt on demand, pools of gone endpoints closed."""
        self.snapshot = snapshot
        self.plans = {}
        self.keys = {}
        live = {ep for c in snapshot.clusters.values() for ep in c.endpoints}
        live.update(self.original.values())
        self.upstreams.prune(live)

    def plan(self, route: routing.Route) -> Plan:
        plan = self.plans.get(route)
        if plan is None:
            plan = self.plans[route] = Plan(route, None, route.name)
        return plan

    def inbound_plan(self, cluster: str) -> Plan:
        plan = self.plans.get(cluster)
        if plan is None:
            plan = self.plans[cluster] = Plan(None, cluster, "inbound")
        return plan

    def key(self, reporter: str, route: str, cluster: Cluster | None) -> Key:
        """The stats key of (route, cluster): the service is the cluster's (inbound: the service
        the inbound listener serves on that port)."""
        name = cluster.name if cluster is not None else ""
        k = (reporter, route, name)
        key = self.keys.get(k)
        if key is None:
            service = ""
            if cluster is not None:
                service = cluster.spec.get("service") or ""
                if not service and reporter == DESTINATION:
                    service = self._inbound_service(name)
                service = service or name
            key = self.keys[k] = self.runtime.stats.request_key(reporter, UNKNOWN_PEER, service_host=service)
        return key

    def _inbound_service(self, cluster: str) -> str:
        for listener in (self.snapshot.config.get("listeners") or {}).get("inbound") or ():
            if listener.get("cluster") == cluster and listener.get("services"):
                return listener["services"][0].get("service", "")
        return ""

    def original_endpoint(self, address: tuple[str, int]) -> Endpoint:
        """The endpoint an ORIGINAL_DST (passthrough) cluster forwards to: where the client dialled."""
        ep = self.original.get(address)
        if ep is None:
            ep = self.original[address] = Endpoint({"address": address[0], "port": address[1]})
        return ep

    def add(self, conn: HttpConnection) -> None:
        self.connections.add(conn)
        if self._sweeper is None:
            self._sweeper = self.reactor.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.reactor.now
        draining = self.runtime.draining
        for conn in list(self.connections):
            conn.check_idle(now, draining)
        if self.connections:
            self._sweeper = self.reactor.call_later(SWEEP_INTERVAL, self._sweep)

    def close_idle(self) -> None:
        """Close every downstream connection between requests and every idle upstream one (drain)."""
        for conn in list(self.connections):
            if conn.req is None:  # between requests, or lingering (a tunnel's request is open)
                conn.close()
        self.upstreams.close_all()


def http_state(runtime: Any) -> HttpState:
    """The runtime's shared L7 state, created on first use (kept as `runtime.http`)."""
    state = getattr(runtime, "http", None)
    if state is None:
        state = runtime.http = HttpState(runtime)
    return state


def _reseed() -> None:
    """A fresh random prefix for x-request-id: per process (re-drawn in forked workers)."""
    global _rid_prefix, _rid_next
    h = b"%020x" % random.SystemRandom().getrandbits(80)
    _rid_prefix = b"%s-%s-4%s-%x%s-" % (h[:8], h[8:12], h[13:16], 8 | (h[16] & 3), h[17:20])
    _rid_next = itertools.count(random.SystemRandom().getrandbits(40)).__next__


_rid_prefix = b""
_rid_next = itertools.count().__next__
_reseed()
os.register_at_fork(after_in_child=_reseed)


def request_id() -> bytes:
    """A UUID-shaped x-request-id (version 4 layout, as Envoy's): 74 random bits per process and a
    48-bit counter, unique without a random draw per request."""
    return b"%s%012x" % (_rid_prefix, _rid_next() & 0xFFFFFFFFFFFF)
