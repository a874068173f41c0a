"""The per-request stages before forwarding, as an ordered chain of sans-IO filters (Envoy's HTTP
filter chain: `decodeHeaders` returns continue or stop; linkerd2-proxy's layers).

A filter is a function of the exchange's context (the shell's `HttpConnection`, or anything with
the same fields: tests use a plain namespace) that returns None to continue with the next filter,
or a `LocalReply` that stops the request and answers it. It reads `ctx.req`, `ctx.snap`,
`ctx.authority`, ... and may set what later stages read (`ctx.req` when an upgrade is stripped,
`ctx.peer_md`, `ctx.plan`). The chain is a tuple built once per direction (`chain`); a new stage
is one more function in it, not a branch in the connection class. The router filter comes last:
it leaves `ctx.plan` for the shell, which forwards (router.decide for a route that is not simple).

Stages: peer metadata (inbound: who the calling workload is, from Istio's metadata exchange),
upgrade verdicts (upgrades.py), authorization (inbound: the workload's AuthorizationPolicies,
authz.py), route selection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bus.logs import Log
from dataplane.proxy import peer_metadata
from dataplane.proxy.authz import DENIED_BODY
from dataplane.proxy.flags import NR, RBAC
from dataplane.proxy.http.exchange import LocalReply, asks_switch
from dataplane.proxy.http.router import HeaderView, routing_request
from dataplane.proxy.http.upgrades import REFUSE, STRIP, stripped, verdict

Filter = Callable[[Any], "LocalReply | None"]

_PEER_MD = peer_metadata.HEADER
_audit_log = Log("proxy.authz")  # AUDIT policies' matches, one line each
_REFUSED = LocalReply(403)  # Envoy's upgrade_failed: no body
_NO_ROUTE = LocalReply(404, flags=(NR,))


def peer_metadata_in(ctx: Any) -> LocalReply | None:
    """Inbound: the caller's workload from its metadata exchange header, for the metrics' labels
    (the header itself is never forwarded, hopbyhop.REQUEST_DROP)."""
    md = ctx.hdict.get(_PEER_MD)
    if md is not None:
        ctx.md = True
        ctx.peer_md = ctx.state.peers.get(md)
    return None


def upgrade(ctx: Any) -> LocalReply | None:
    """An Upgrade or CONNECT request: forwarded, forwarded as plain HTTP (h2c), or refused."""
    req = ctx.req
    if not asks_switch(req):
        return None
    allowed = verdict(req.method, req.upgrade, ctx.opts.upgrade_types)
    if allowed == STRIP:
        ctx.req = stripped(req, ctx.parser)
    elif allowed == REFUSE:
        ctx.rare = True  # the end of the exchange resumes the paused parser: the connection goes on
        return _REFUSED
    return None


def authorize(ctx: Any) -> LocalReply | None:
    """Inbound: the workload's AuthorizationPolicies; a denial is Envoy's 403 (flag RBAC)."""
    snap = ctx.snap
    if not snap.authz.active or ctx.inbound_cluster is None:
        return None
    req = ctx.req
    method = req.method.decode("latin-1")
    path = req.target.decode("latin-1")
    decision = snap.authz.check_http(ctx.peer[0], ctx.principal, ctx.local[1], method, path,
                                     ctx.authority.decode("latin-1"), HeaderView(req.headers))
    if decision.audit:
        _audit_log.info("audit", proxy=ctx.rt.node_id, policy=decision.audit, allowed=decision.allowed,
                        source=ctx.peer_str, principal=ctx.principal or "-", method=method, path=path)
    if decision.allowed:
        return None
    return LocalReply(403, DENIED_BODY, flags=(RBAC,), route="inbound",
                      cluster=snap.clusters.get(ctx.inbound_cluster))


def route(ctx: Any) -> LocalReply | None:
    """The route (outbound: the port's RouteConfig by Host and the route's conditions; inbound: the
    inbound cluster) as `ctx.plan`. A keep-alive client asking the same Host again on the same
    config reuses its last decision, when that depended on the Host alone."""
    snap = ctx.snap
    authority = ctx.authority
    if authority == ctx.c_auth and snap is ctx.c_snap:
        ctx.plan = ctx.c_plan
        return None
    state = ctx.state
    if snap is not state.snapshot:
        state.swap(snap)
    if ctx.inbound_cluster is not None:
        plan = state.inbound_plan(ctx.inbound_cluster)
    else:
        rc = snap.routes.get(ctx.route_port)
        vh = rc.select_virtual_host(authority.decode("latin-1")) if rc is not None else None
        if vh is None or not vh.routes or vh.routes[0].conditions:
            ctx.c_snap = None  # no host, or a route that depends on more than the host: nothing to remember
            found = vh.match(routing_request(ctx.req, authority)) if vh is not None else None
            if found is None:
                return _NO_ROUTE
            ctx.plan = state.plan(found)
            return None
        plan = state.plan(vh.routes[0])
    ctx.c_auth = authority
    ctx.c_snap = snap
    ctx.c_plan = plan
    ctx.plan = plan
    return None


OUTBOUND: tuple[Filter, ...] = (upgrade, route)
INBOUND: tuple[Filter, ...] = (peer_metadata_in, upgrade, authorize, route)


def chain(direction: str) -> tuple[Filter, ...]:
    """The filters a listener's requests go through, in order."""
    return INBOUND if direction == "inbound" else OUTBOUND

