"""The sidecar's L7 engine: Envoy's HTTP connection manager and router for HTTP/1.1, one
`HttpConnection` per accepted downstream socket.

Per request (pipelined ones are answered in order, one at a time): take `runtime.snapshot` (the
request finishes on it even if a config swap replaces it meanwhile), route (outbound: the
port's RouteConfig by Host; inbound: the inbound cluster), apply faults, redirects, direct
responses, header operations and rewrites, pick the weighted cluster and an endpoint, respect
the cluster's circuit breakers (503 UO), and forward over a pooled keep-alive connection
(upstream.py), streaming bodies both ways. Retries follow the route's RetryPolicy (with Envoy's
previous-hosts avoidance and the cluster's retry budget); a request that fails on a reused
connection before any response byte is retried once more, transparently, as Envoy does for
the keep-alive race. Every try is reported to the cluster for outlier detection; mirrors get
a fire-and-forget copy (Host suffixed "-shadow"); a 101 (or a CONNECT 2xx) turns the
connection into a tunnel.

What it needs from the Runtime (dataplane.proxy.runtime): `reactor`, `snapshot` (`routes`,
`clusters`, `config`), `stats`, `access_log`, `rng`, `draining`; it keeps its shared state
(`HttpState`: pools, plans, live connections) on the runtime as `runtime.http`.

Why it is shaped this way (the hot path is the point of this module):

* The exchange state lives in the connection's slots, reset per request: no per-request objects
  beyond what the codec returns, and fields only unusual requests touch are cleared only after
  one (`rare`). Each upstream try is bound by pointing the upstream fd's reactor callback at this
  connection (`set_callback`, no syscall); sockets are registered edge-triggered once, so steady
  traffic makes no epoll_ctl calls at all.
* What depends only on the route or the cluster (header operations as bytes, the resolved
  cluster and its stats key, whether anything special applies) is computed once per route per
  config (`_Plan`), and a connection remembers its last routing decision, so a keep-alive client
  asking the same Host again skips routing. The usual request then costs one dict of its fields,
  one list comprehension for the forwarded head and one write; a response read in one recv
  (head, body, end) goes back in one write.
* Back-pressure: a side is read only while what the proxy holds for its peer is under
  MAX_BUFFER (a short write stops reading the other side until the EPOLLOUT edge), so a
  connection holds at most that plus one read per direction, whatever the peers do. Request
  bodies up to RETRY_BUFFER are kept for retries and mirrors; bigger ones stream and are not
  retried. The rest of a large
  Content-Length response body (SPLICE_MIN or more) moves socket to pipe to socket with splice,
  never through Python (as tcp.py does for bulk L4 data).
* Batched writes: what goes to the client, and a request head going upstream, is queued and
  written once the reactor has dispatched its whole batch of events (`call_soon`). Each write
  wakes a peer (wrk, the app) that would otherwise preempt the worker in the middle of the batch,
  which cost more than the writes themselves: under wrk this saves about 15% of the CPU per
  request. The price is latency inside a busy batch (at most the rest of the batch), none when
  events come one at a time. A large body's splice starts only behind a written head.
* Timers cost only when armed: a route timeout, a per-try timeout, a fault delay or a retry
  back-off, and the header timeout only while a partial head is buffered. Idle keep-alive
  connections, stalled request bodies (`last` is the time of the last read) and draining are
  handled by one sweep a second per worker (`HttpState`); the listener's `HttpOptions` set them.

Istio's metadata exchange (peer_metadata.py), so the metrics name both workloads: requests to an
in-mesh upstream (the endpoint's pool does Istio mTLS) carry our precomputed metadata lines; the
peer's, from a request (inbound) or a response (outbound), go through the worker's PeerCache to a
`Peer` whose stats keys are cached per route key; an inbound request that carried metadata is
answered with ours. Peers' metadata fields are always dropped, so apps never see them.

Local replies carry Envoy's bodies and response flags (flags.py), keep the connection alive
when the request was read whole, and close it otherwise. A bad request gets the codec's status
and a close; a client that stalls mid-head or mid-body gets 408. Upgrades: see upgrades.py.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from typing import Any

from dataplane.proxy import peer_metadata, pump, routing, sockets, tls
from dataplane.proxy.blackhole import BLACKHOLE, HTTP_BODY, HTTP_STATUS
from dataplane.proxy.cluster import CONNECT_FAILURE, RESET, TIMEOUT, Endpoint
from dataplane.proxy.flags import DI, SI
from dataplane.proxy.flags import join as join_flags
from dataplane.proxy.http import filters, hopbyhop, router, target
from dataplane.proxy.http.codec import (
    CLOSED,
    NEED_DATA,
    Data,
    EndOfMessage,
    HTTPError,
    Request,
    RequestParser,
    Response,
    ResponseParser,
)
from dataplane.proxy.http.exchange import (
    FRAME_AS_IS,
    FRAME_CHUNK,
    FRAME_TUNNEL,
    LocalReply,
    asks_switch,
    connection_line,
    forward_fields,
    forward_head,
    framing,
    keep_alive,
    local_reply,
    response_fields,
    unrequested_switch,
    wants_continue,
)
from dataplane.proxy.http.mirror import mirror
from dataplane.proxy.http.options import DEFAULT, HttpOptions
from dataplane.proxy.http.policy import (
    EXHAUSTED,
    NO_HEALTHY_UPSTREAM,
    OVERFLOW_BODY,
    PROTOCOL_ERROR_BODY,
    TIMEOUT_BODY,
    YES,
    failure_reply,
    race_retry,
    retry_verdict,
)
from dataplane.proxy.http.router import Forward, Plan
from dataplane.proxy.http.serialize import CONTINUE, error_response, last_chunk
from dataplane.proxy.http.state import UNKNOWN_PEER, http_state, request_id
from dataplane.proxy.http.tunnel import Tunnel
from dataplane.proxy.http.upstream import BLACKHOLED, OVERFLOW, PENDING, EndpointPool, UpstreamConn
from dataplane.proxy.reactor import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor, Timer
from dataplane.proxy.routing import HeaderOps
from dataplane.proxy.stats import DESTINATION, SOURCE

READ_SIZE = 65536
MAX_BUFFER = 65536  # bytes held for a peer before the proxy stops reading the other side
RETRY_BUFFER = 65536  # request bodies up to this size are kept for retries and mirrors
LINGER = 2.0  # a closing connection drops what the client still sends for this long, then closes
SPLICE_MIN = 128 * 1024  # a response body with at least this much left goes through a pipe

_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_ENDING = EPOLLRDHUP | EPOLLHUP | EPOLLERR  # a FIN or reset waits behind the data: read until it shows

_PEER_MD = peer_metadata.HEADER


class HttpConnection:
    """One accepted downstream HTTP/1.1 connection, and the request it is serving.

    `direction` "outbound" routes by Host with `runtime.snapshot.routes[route_port]`; "inbound"
    sends everything to `inbound_cluster` (the local app). `peer` and `local` are the client's
    and the (original destination) local address; `initial` is what was read while sniffing.
    """

    __slots__ = (
        "attempts", "authority", "body", "body_size", "c_auth", "c_plan", "c_snap", "chain", "closed",
        "closing", "cluster", "code", "conn", "d_ending", "d_eof", "d_pending", "d_read", "d_readable",
        "d_write", "detail", "direction", "ep", "ep_live", "fd",
        "flags", "hash_key", "hdict", "head", "head_timer", "in_pump",
        "inbound_cluster", "keep", "last", "linger_timer", "local", "local_str", "md", "md_out", "opts",
        "parser", "peer", "peer_md", "peer_str", "pipe", "piped", "plan", "pool_wait", "principal",
        "race_retried", "rare", "reactor", "reporter",
        "req", "req_bytes", "req_done", "resp", "resp_bytes", "resp_done", "resp_frame", "resp_head",
        "resp_ops", "retries", "retry_held", "rid", "route_port", "route_timer", "rt", "sent_at", "skey",
        "snap", "sock", "splice_left", "state", "t0", "tried", "try_timer", "tunnel", "up_cb", "up_ending",
        "up_got", "up_hold", "up_id", "up_pending", "up_queued", "up_readable", "wait_timer", "wall0",
    )

    def __init__(self, runtime: Any, sock: socket.socket, *, direction: str, route_port: str | None,
                 inbound_cluster: str | None, peer: tuple[str, int], local: tuple[str, int],
                 initial: bytes = b"", options: HttpOptions = DEFAULT, principal: str = "") -> None:
        if direction not in ("outbound", "inbound"):
            raise ValueError(f"direction must be outbound or inbound, not {direction!r}")
        self.rt = runtime
        self.state = http_state(runtime)
        self.reactor: Reactor = runtime.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.d_read, self.d_write = tls.io_funcs(sock)  # the client's bytes: os.read/os.write, or TLS
        self.parser = RequestParser()
        self.direction = direction
        self.reporter = SOURCE if direction == "outbound" else DESTINATION
        self.route_port = route_port
        self.inbound_cluster = inbound_cluster if direction == "inbound" else None
        self.peer = peer
        self.local = local
        self.principal = principal  # the peer's SPIFFE id when it came over mutual TLS, else ""
        # outbound: our metadata lines for in-mesh upstreams; None inbound
        md = self.state.own_metadata()
        self.md_out: bytes | None = md if direction == "outbound" else None
        self.peer_str = f"{peer[0]}:{peer[1]}"
        self.local_str = f"{local[0]}:{local[1]}"
        self.opts = options  # the listener's timeouts and allowed upgrades (options.py)
        self.d_readable = self.d_ending = self.d_eof = False
        self.d_pending = b""
        self.closed = self.closing = self.in_pump = False
        self.head_timer: Timer | None = None
        self.linger_timer: Timer | None = None
        self.tunnel: Tunnel | None = None
        self.last = self.reactor.now
        self.up_cb = self._on_up
        self.up_pending: list[bytes] = []
        self.up_queued = 0
        self.up_hold = False
        self.snap = self.plan = self.skey = self.hdict = self.ep = None
        self.rid = self.head = self.authority = b""
        self.chain = filters.chain(direction)  # the per-request stages (filters.py)
        self.code = 0
        self.keep = False
        self.t0 = self.sent_at = self.wall0 = 0.0
        self.c_auth: bytes | None = None  # the last routing decision, for the next request alike
        self.c_snap: Any = None
        self.c_plan: Plan | None = None
        self.rare = True
        self._reset()
        self.state.add(self)
        self.reactor.register(self.fd, _MASK, self._on_down)
        if initial:
            self.parser.feed(initial)
            self._pump_down()

    def _reset(self) -> None:
        """Clear the per-request state (between requests). What the next request always sets before
        reading it (snapshot, plan, head, times...) is left; what only unusual requests touch is
        cleared only after one (`rare`)."""
        self.req = self.conn = self.resp = self.cluster = None
        self.up_id = ""  # the upstream's SPIFFE id when the try went over mutual TLS
        self.md = False  # inbound: the request carried peer metadata; outbound: this try sent ours
        self.peer_md: peer_metadata.Peer | None = None  # the peer's workload, from its metadata
        self.ep_live = self.req_done = self.resp_done = False
        self.body: tuple[bytes, ...] | list[bytes] | None = ()
        self.head = b""
        self.body_size = self.req_bytes = self.resp_bytes = self.resp_head = self.attempts = 0
        if self.rare:
            self._reset_rare()

    def _reset_rare(self) -> None:
        self.rare = False
        self.flags: tuple[str, ...] = ()
        self.tried: tuple[Endpoint, ...] = ()
        self.detail: str | None = None
        self.hash_key: str | None = None
        self.resp_ops: HeaderOps | None = None
        self.resp_frame = FRAME_AS_IS
        self.route_timer: Timer | None = None
        self.try_timer: Timer | None = None
        self.wait_timer: Timer | None = None
        self.pool_wait: EndpointPool | None = None
        self.race_retried = False
        self.retries = self.retry_held = 0
        self.pipe: tuple[int, int] | None = None
        self.piped = self.splice_left = 0

    def _flag(self, flag: str, detail: str | None = None) -> None:
        self.flags += (flag,)
        self.rare = True
        if detail is not None:
            self.detail = detail

    # --- downstream --------------------------------------------------------------------------

    def _on_down(self, mask: int) -> None:
        if mask & EPOLLOUT:
            if self.d_pending:
                self._flush_down()
            elif self.pipe is not None:
                self._splice_body()
        if mask & _IN:
            if mask & _ENDING:
                self.d_ending = True
            self.d_readable = True
            self._read_down()

    def _read_down(self) -> None:
        parser = self.parser
        read = self.d_read
        while self.d_readable and not self.closed:
            if self.req is not None and parser.buffered >= MAX_BUFFER:
                return  # the request waits on its peer: resumed when the exchange moves on
            try:
                data = read(READ_SIZE)
            except BlockingIOError:
                self.d_readable = False
                return
            except OSError as e:
                self.d_readable = False
                self._down_broken(e)
                return
            if data:
                self.last = self.reactor.now  # for the sweep: idle keep-alive, stalled body
                if len(data) < READ_SIZE and not self.d_ending:
                    self.d_readable = False  # a short read from a stream socket: it is drained
                parser.feed(data)
            else:
                self.d_readable = False
                self.d_eof = True
                parser.feed_eof()
            self._pump_down()

    def _pump_down(self) -> None:
        """Pull request events while the exchange can take them."""
        if self.in_pump:
            return
        self.in_pump = True
        parser = self.parser
        try:
            while not self.closing:
                if self.req is None:
                    ev = parser.next_event()
                    if ev.__class__ is Request:
                        if self.head_timer is not None:
                            self.head_timer.cancel()
                            self.head_timer = None
                        self._on_head(ev)
                        continue
                    if ev is NEED_DATA:
                        timeout = self.opts.request_headers_timeout
                        if self.head_timer is None and parser.buffered and timeout != math.inf:
                            self.head_timer = self.reactor.call_later(timeout, self._on_head_timeout)
                    elif ev is CLOSED:
                        self.close()
                    return
                if self.req_done or self.conn is None or self.up_queued >= MAX_BUFFER:
                    return
                ev = parser.next_event()
                cls = ev.__class__
                if cls is EndOfMessage:
                    self._on_req_end(ev)
                elif cls is Data:
                    self._on_body(ev.data)
                else:
                    return  # NEED_DATA, or PAUSED after an upgrade request
        except HTTPError as e:
            self._bad_request(e)
        finally:
            self.in_pump = False
            if self.up_hold:  # the head waited for the body already here: one write for both
                self.up_hold = False
                if self.conn is not None:
                    self._flush_up()

    def _resume_down(self) -> None:
        """Pull what the exchange can take now, then read on (outside a pump: that one goes on)."""
        if self.in_pump:
            return
        self._pump_down()
        if self.d_readable and not self.closed:
            self._read_down()

    def _send_down(self, data: bytes) -> None:
        """Queue `data` for the client: it is written after the current event batch, together with
        whatever else the batch adds (see the module docstring: batched writes)."""
        if self.d_pending:
            self.d_pending += data
            return
        self.d_pending = data
        self.reactor.call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        if self.d_pending and not self.closed:
            self._flush_down()

    def _write_pending(self) -> bool:
        """Write what waits for the client now; True when nothing is left."""
        data = self.d_pending
        if data:
            try:
                n = self.d_write(data)
            except BlockingIOError:
                return False
            except OSError as e:
                self._down_broken(e)
                return False
            self.d_pending = data[n:]
        return not self.d_pending

    def _flush_down(self) -> None:
        if not self._write_pending():
            return
        if self.tunnel is not None:
            self.tunnel.resume_up()
        elif self.closing and self.req is None:
            self._linger()
        elif self.conn is not None and self.up_readable:
            self._read_up()

    def _on_head_timeout(self) -> None:
        self.head_timer = None
        if self.req is None and not self.closed:
            self._send_down(error_response(408, "request header timeout"))
            self._close_after_flush()

    def check_idle(self, now: float, draining: bool) -> None:
        """The sweep: close a keep-alive connection idle too long (or any idle one when draining);
        end a request whose body stopped coming (no timer per request: `last` is the last read)."""
        if self.tunnel is not None:
            if now - self.last >= self.opts.idle_timeout:
                self.tunnel.close()
        elif self.req is not None:
            if not self.req_done and now - self.last >= self.opts.stream_idle_timeout:
                self._flag(SI, "stream_idle_timeout")  # Envoy's: 408 before a response, else a reset
                self._drop_upstream(report=True)  # mid-request: never back to the pool
                if self.resp is None:
                    self._local_reply(408, b"stream timeout", close=True)
                else:
                    self._abort_downstream()
        elif not self.closing and self.head_timer is None and (
                draining or now - self.last >= self.opts.idle_timeout):
            self.close()

    def _bad_request(self, err: HTTPError) -> None:
        """The codec refused the client's bytes: its status, then close."""
        if self.req is None:
            self._send_down(error_response(err.status, err.reason))
            self._close_after_flush()
        elif self.resp is None:
            self._drop_upstream(report=True)
            self._flag("DPE", err.reason)
            self._local_reply(err.status, err.reason.encode(), close=True)
        else:
            self._flag("DPE", err.reason)
            self._abort_downstream()

    def _down_broken(self, _err: OSError) -> None:
        """The client reset or vanished: abandon the exchange (flag DC) and close."""
        if self.req is not None:
            self._flag("DC")
        self.close()

    def _close_after_flush(self) -> None:
        self.closing = True
        if not self.d_pending:
            self._linger()

    def _linger(self) -> None:
        """Half-close, then read and drop until the client closes (or LINGER passes), so the
        kernel does not answer its last bytes with a reset that would destroy our response."""
        if self.closed or self.linger_timer is not None:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.linger_timer = self.reactor.call_later(LINGER, self.close)
        self.reactor.set_callback(self.fd, self._on_linger)
        self._on_linger(EPOLLIN)

    def _on_linger(self, mask: int) -> None:
        if not mask & _IN:
            return
        while True:
            try:
                data = self.d_read(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return

    def close(self) -> None:
        """Close now; a request still in progress is accounted (with what flags it has) first."""
        if self.closed:
            return
        self.closed = True
        for timer in (self.head_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            self.state.upstreams.close(tunnel.conn)
        if self.req is not None:
            self._account()
        if self.d_pending:  # what this batch queued, e.g. an aborted response so far: best effort
            with contextlib.suppress(OSError):
                self.d_write(self.d_pending)
        self.reactor.unregister(self.fd)
        self.reactor.call_soon(self.sock.close)  # after this batch: the fd number is not reused meanwhile
        self.state.connections.discard(self)

    # --- request ------------------------------------------------------------------------------

    def _on_head(self, req: Request) -> None:
        """A request head: through the listener's filters (filters.py: peer metadata, upgrades,
        authorization, the route), then forwarded, or answered locally."""
        rt = self.rt
        self.snap = rt.snapshot
        target.normalize_request(req, self.snap.path_normalization)  # once, before authorization and routing
        self.req = req
        self.t0 = self.reactor.now
        if rt.access_log.enabled:
            self.wall0 = time.time()
        self.hdict = dict(req.headers)
        authority = self.authority = req.host or self.local_str.encode()
        for stage in self.chain:
            reply = stage(self)
            if reply is not None:
                self._reply(reply)
                return
        req = self.req  # an upgrade filter may have stripped it
        plan = self.plan
        cluster = plan.target
        if cluster is None or not plan.plain or cluster.ejected or req.expect_continue:
            if plan.simple:
                self._route_to(plan.cluster, None, req.target, authority)
            else:
                self._special(req, plan, authority)
            return
        # the usual request: a plain cluster already resolved for this plan, an idle connection
        self.skey = plan.target_key
        if not cluster.pool.requests.try_acquire():
            self._flag("UO")
            self._local_reply(503, OVERFLOW_BODY)
            return
        self.cluster = cluster
        self.head = self._request_head(req, req.target, authority, None)
        self._attempt(cluster.pick())

    def _reply(self, reply: LocalReply) -> None:
        """Answer a request a filter or the router stopped, under the stats key it names."""
        state = self.state
        if self.snap is not state.snapshot:
            state.swap(self.snap)
        self.skey = state.key(self.reporter, reply.route, reply.cluster)
        for flag in reply.flags:
            self._flag(flag)
        self._local_reply(reply.status, reply.body, reply.fields)

    def _route_to(self, name: str, ops: HeaderOps | None, path: bytes, authority: bytes) -> None:
        """Resolve the cluster (and its stats key), take the request budget, build the upstream
        head, start the first try."""
        req = self.req
        plan = self.plan
        cluster = plan.target  # only a simple plan's, which `name` is
        if cluster is None:
            cluster = self.snap.clusters.get(name)
            if cluster is None:
                self.skey = self.state.key(self.reporter, plan.name, None)
                self._flag("NC")
                self._local_reply(503)
                return
            key = plan.keys.get(name)
            if key is None:
                key = plan.keys[name] = self.state.key(self.reporter, plan.name, cluster)
            if plan.simple:
                plan.target = cluster
                plan.target_key = key
                plan.plain = cluster.hash_policy is None and not cluster.original_destination
            self.skey = key
        else:
            self.skey = plan.target_key
        if not cluster.pool.requests.try_acquire():
            self._flag("UO")
            self._local_reply(503, OVERFLOW_BODY)
            return
        self.cluster = cluster  # from here on, _account releases the request budget
        if cluster.hash_policy is not None:
            self.rare = True
            self.hash_key = cluster.hash_policy.key(
                router.HeaderView(req.headers), self.peer[0], routing.parse_query(path.decode("latin-1")))
        self.head = self._request_head(req, path, authority, ops)
        if wants_continue(req):
            self._send_down(CONTINUE)  # Envoy's default: answer 100 here, not forward Expect
        self._attempt(None)

    def _special(self, req: Request, plan: Plan, authority: bytes) -> None:
        """The slow path of routing (router.decide): direct responses, redirects, faults, the
        weighted pick, rewrites and header operations."""
        decision = router.decide(plan, req, authority, self.rt.rng, self.snap.clusters)
        self.rare = True
        if decision.__class__ is LocalReply:
            self._reply(decision)  # type: ignore[arg-type]
            return
        self.resp_ops = decision.resp_ops
        if decision.delay_ms:
            self._flag(DI)
            self.wait_timer = self.reactor.call_later(decision.delay_ms / 1000,
                                                      lambda: self._delayed(decision))
            return
        self._route_to(decision.cluster, decision.req_ops, decision.path, decision.authority)

    def _delayed(self, decision: Forward) -> None:
        self.wait_timer = None
        if self.req is not None and not self.closed:
            self._route_to(decision.cluster, decision.req_ops, decision.path, decision.authority)

    def _request_head(self, req: Request, path: bytes, authority: bytes, ops: HeaderOps | None) -> bytes:
        """The head sent upstream (exchange.py), with Envoy's x-forwarded-proto and x-request-id."""
        hdict = self.hdict
        lines = forward_fields(req, hdict, ops, authority)
        if b"x-forwarded-proto" not in hdict:
            lines.append(b"x-forwarded-proto: http")
        rid = hdict.get(b"x-request-id")
        if rid is None:
            rid = request_id()
            lines.append(b"x-request-id: " + rid)
        self.rid = rid
        if req.upgrade is not None or req.method == b"CONNECT":
            self.rare = True  # the response may switch protocols: _response_head and _resp_end look
        return forward_head(req, lines, path)

    def _on_body(self, data: bytes) -> None:
        n = len(data)
        self.req_bytes += n
        if self.req.chunked:
            data = b"%x\r\n%s\r\n" % (n, data)
        body = self.body
        if body is not None:
            if self.body_size + len(data) <= RETRY_BUFFER:
                if body.__class__ is tuple:
                    self.body = [data]
                else:
                    body.append(data)
                self.body_size += len(data)
            else:
                self.body = None  # too big to keep: this request will not be retried or mirrored
        self._send_up(data)

    def _on_req_end(self, ev: EndOfMessage) -> None:
        self.req_done = True
        req = self.req
        if req.chunked:
            tail = last_chunk(hopbyhop.trailers(ev.trailers, req.connection) if ev.trailers else ())
            if self.body is not None:
                self.body = [*self.body, tail]
            self._send_up(tail)
        if self.plan.at_end:
            self._timed_and_mirrored()

    def _timed_and_mirrored(self) -> None:
        """At the end of the request: start the route and per-try timeouts, fire mirrors."""
        plan = self.plan
        reactor = self.reactor
        self.rare = True
        if plan.mirrors and self.body is not None:
            self._mirror()
        if plan.timeout and self.route_timer is None:
            self.route_timer = reactor.call_later(plan.timeout, self._on_route_timeout)
        if plan.try_timeout and self.conn is not None and self.try_timer is None:
            self.try_timer = reactor.call_later(plan.try_timeout, self._on_try_timeout)

    # --- upstream tries -------------------------------------------------------------------------

    def _attempt(self, ep: Endpoint | None) -> None:
        """Start a try on `ep` (None: pick one, avoiding earlier ones on retries), get a connection
        (an idle one at once, else a new or a queued one), and send."""
        cluster = self.cluster
        if ep is None:
            if cluster.original_destination:
                ep = self.state.original_endpoint(self.local)
            else:
                if cluster.ejected:
                    cluster.tick(self.reactor.now * 1000)
                ep = cluster.pick(self.hash_key, self.tried)
            if ep is None:
                self._flag("UH")
                self._local_reply(503, NO_HEALTHY_UPSTREAM)
                return
        pool = self.state.upstreams.pools.get(ep)
        if pool is not None and pool.idle and pool.limits is cluster.pool:
            conn = pool.idle.pop()
            conn.owner = self
        else:
            ups = self.state.upstreams
            pool = ups.pool(cluster, ep)
            conn = ups.acquire(pool, self)
            if conn is BLACKHOLED:  # the endpoint is this proxy's own listener
                self.skey = self.rt.stats.request_key(self.reporter, UNKNOWN_PEER, service_host=BLACKHOLE,
                                                      service_name=BLACKHOLE)
                self._flag("UH")
                self._local_reply(HTTP_STATUS, HTTP_BODY)
                return
            if conn is OVERFLOW:
                self._flag("UO")
                self._local_reply(503, OVERFLOW_BODY)
                return
        cluster.start(ep)
        self.ep = ep
        self.ep_live = True
        self.attempts += 1
        if conn is PENDING:
            self.rare = True
            self.pool_wait = pool
        else:
            self._bind(conn)

    def _retry_now(self) -> None:
        self.wait_timer = None
        if self.req is not None and not self.closed:
            self._attempt(None)

    def upstream_ready(self, conn: UpstreamConn) -> None:
        """A pending try got its connection (from upstream.py)."""
        self.pool_wait = None
        self._bind(conn)

    def _bind(self, conn: UpstreamConn) -> None:
        """Send this try's head (and the body kept so far) on `conn`."""
        req = self.req
        self.conn = conn
        self.up_got = self.up_readable = self.up_ending = False
        conn.parser.request_sent(req.method)
        head = self.head
        if self.md_out is not None:
            self.md = conn.pool.tls is not None  # in the mesh: tell it who we are (as Istio's sidecar)
            if self.md:
                head = head[:-2] + self.md_out + b"\r\n"
        if self.attempts > 1:
            head = head[:-2] + b"x-envoy-attempt-count: %d\r\n\r\n" % self.attempts
        if self.body:
            head = b"".join([head, *self.body])
        self.sent_at = self.reactor.now
        if conn.connected and self.in_pump and not self.req_done and (req.content_length or req.chunked):
            self.reactor.set_callback(conn.fd, self.up_cb)
            self.up_pending.append(head)  # sent when the pump has pulled what is here of the body
            self.up_queued += len(head)
            self.up_hold = True
        elif conn.connected:
            self.reactor.set_callback(conn.fd, self.up_cb)
            self.up_pending.append(head)  # written after this event batch, as downstream writes are
            self.up_queued += len(head)
            self.reactor.call_soon(self._flush_up_batch)
        else:
            self.up_pending.append(head)
            self.up_queued += len(head)
        if self.req_done:
            if self.plan.try_timeout and self.try_timer is None:
                self.rare = True
                self.try_timer = self.reactor.call_later(self.plan.try_timeout, self._on_try_timeout)
        elif not self.in_pump:
            self._resume_down()

    def _flush_up_batch(self) -> None:
        conn = self.conn
        if conn is not None and conn.connected and self.up_pending and not self.closed:
            self._flush_up()

    def upstream_connected(self, conn: UpstreamConn) -> None:
        self.reactor.set_callback(conn.fd, self.up_cb)
        if self.up_pending:
            self._flush_up()

    def upstream_failed(self, conn: UpstreamConn, detail: str) -> None:
        if conn is self.conn:
            self.conn = None
            self._try_failed(CONNECT_FAILURE, "UF", detail)

    def _send_up(self, data: bytes) -> None:
        conn = self.conn
        if self.up_pending or not conn.connected:
            self.up_pending.append(data)
            self.up_queued += len(data)
            return
        try:
            n = conn.write(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._up_write_failed()
            return
        if n < len(data):
            self.up_pending.append(data[n:])
            self.up_queued += len(data) - n

    def _flush_up(self) -> None:
        conn = self.conn
        pending = self.up_pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            n = conn.write(data)
        except BlockingIOError:
            return
        except OSError:
            self._up_write_failed()
            return
        pending.clear()
        if n < len(data):
            pending.append(data[n:])
            self.up_queued = len(data) - n
            return
        self.up_queued = 0
        if not self.req_done:
            self._resume_down()

    def _up_write_failed(self) -> None:
        """The server stopped reading: what it sent before (an early response, or its FIN/reset)
        tells what happened, so read it."""
        self.up_pending.clear()
        self.up_queued = 0
        self.up_readable = True
        if not self.d_pending:
            self._read_up()

    def _on_up(self, mask: int) -> None:
        if mask & EPOLLOUT and self.up_pending:
            self._flush_up()
        if mask & _IN and self.conn is not None:
            if self.pipe is not None:
                self._splice_body()
                return
            if mask & _ENDING:
                self.up_ending = True
            self.up_readable = True
            if not self.d_pending:
                self._read_up()

    def _read_up(self) -> None:
        """Read the upstream while the client takes what it sends (back-pressure otherwise)."""
        conn = self.conn
        read = conn.read
        self.up_id = conn.peer_id
        parser = conn.parser
        while True:
            try:
                data = read(READ_SIZE)
            except BlockingIOError:
                self.up_readable = False
                return
            except OSError as e:
                self.up_readable = False
                self._up_broken(RESET, "UR", "upstream_" + sockets.errno_name(e.errno or 0))
                return
            if data:
                self.up_got = True
                if len(data) < READ_SIZE and not self.up_ending:
                    self.up_readable = False
                parser.feed(data)
            else:
                self.up_readable = False
                parser.feed_eof()
            if not self._pump_up(conn, not data) or not self.up_readable or self.d_pending:
                return

    def _pump_up(self, conn: UpstreamConn, eof: bool) -> bool:
        """Turn the upstream's bytes into the client's; False when this try is over."""
        next_event = conn.parser.next_event
        out: list[bytes] = []
        while True:
            try:
                ev = next_event()
            except HTTPError as e:
                if out:
                    self._send_down(b"".join(out))
                if eof and self.resp is not None:
                    self._up_broken(RESET, "UC", "upstream_connection_termination")
                else:
                    self._up_broken(RESET, "UPE", "upstream_protocol_error: " + e.reason, protocol=True)
                return False
            cls = ev.__class__
            if cls is Data:
                data = ev.data
                self.resp_bytes += len(data)
                out.append(data if self.resp_frame != FRAME_CHUNK else b"%x\r\n%s\r\n" % (len(data), data))
            elif cls is Response:
                if unrequested_switch(self.req, ev):
                    self._up_broken(RESET, "UPE", "upstream_protocol_error: unrequested 101", protocol=True)
                    return False  # a switch nobody asked for (upgrades.py)
                if ev.status >= 200 or ev.status == 101:  # 100 Continue was answered here; other 1xx dropped
                    head = self._response_head(ev)
                    if head is None:
                        return False  # retried
                    out.append(head)
            elif cls is EndOfMessage:
                if self.resp_frame == FRAME_CHUNK:
                    out.append(last_chunk(hopbyhop.trailers(ev.trailers, self.resp.connection)
                                          if ev.trailers else ()))
                if out:
                    self._send_down(out[0] if len(out) == 1 else b"".join(out))
                if not self.closed:
                    self._resp_end(conn)
                return False
            elif ev is NEED_DATA:
                break
            else:  # CLOSED: the server closed with no response on this try
                self._up_broken(RESET, "UC", "upstream_connection_termination")
                return False
        if out:
            self._send_down(out[0] if len(out) == 1 else b"".join(out))
        resp = self.resp
        if (resp is not None and resp.content_length is not None
                and resp.content_length - self.resp_bytes >= SPLICE_MIN and self._write_pending()):
            return not self._start_splice(conn, resp.content_length - self.resp_bytes)  # behind the head
        return not self.closed

    def _start_splice(self, conn: UpstreamConn, left: int) -> bool:
        """Move the rest of a large Content-Length body socket to socket through a pipe (no copy
        through Python); True when switched. The codec never sees those bytes, so the connection
        gets a fresh parser: nothing else is pending on it (requests are not pipelined upstream)."""
        if self.resp_frame != FRAME_AS_IS or conn.parser.buffered or self.closed:
            return False
        if tls.is_tls(conn.sock) or tls.is_tls(self.sock):
            return False  # TLS bytes go through OpenSSL, not a pipe
        pipe = pump.take_pipe()
        if pipe is None:
            return False
        self.rare = True
        self.pipe = pipe
        self.splice_left = left
        conn.parser = ResponseParser()
        self._splice_body()
        return True

    def _splice_body(self) -> None:
        """Upstream -> pipe -> client until the body is through (pump.py); waits on whichever side is
        not ready."""
        conn = self.conn
        n, self.piped, outcome, err = pump.splice(conn.fd, self.fd, self.pipe, self.piped,  # type: ignore[arg-type]
                                                  self.splice_left)
        self.splice_left -= n
        self.resp_bytes += n
        if outcome == pump.DONE:
            pump.give_pipe(self.pipe, True)  # type: ignore[arg-type]
            self.pipe = None
            self._resp_end(conn)
        elif outcome == pump.WRITE_FAILED:
            self._down_broken(err)  # type: ignore[arg-type]
        elif outcome == pump.READ_FAILED:
            self._up_broken(RESET, "UR", "upstream_" + sockets.errno_name(err.errno or 0))  # type: ignore[union-attr]
        elif outcome == pump.EOF:
            self._up_broken(RESET, "UC", "upstream_connection_termination")

    def _response_head(self, resp: Response) -> bytes | None:
        """The head sent downstream: hop-by-hop fields out, framing redone for the client,
        x-envoy-upstream-service-time in. None: the status earned a retry instead."""
        status = resp.status
        plan = self.plan
        if self.rare and self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if status >= plan.retry_min and self._retry_allowed(status, None):
            self._report(status=status)
            self._drop_upstream()
            self._schedule_retry()
            return None
        self.resp = resp
        self.code = status
        req = self.req
        if self.md and self.md_out is not None:
            for name, value in resp.headers:  # outbound to the mesh: the server's metadata, if it sent any
                if name == _PEER_MD:
                    self.peer_md = self.state.peers.get(value)
        lines = response_fields(resp, self.resp_ops)
        if self.md and self.md_out is None:
            lines += self.state.md_fields  # inbound: answer the peer's metadata with ours
        lines.append(b"x-envoy-upstream-service-time: %d" % ((self.reactor.now - self.sent_at) * 1000))
        if self.attempts > 1:
            lines.append(b"x-envoy-attempt-count: %d" % self.attempts)
        keep = keep_alive(req, self.req_done, self.rt.draining)
        if resp.content_length is None or status == 101 or self.rare:
            self.rare = True
            self.resp_frame, keep, framing_lines = framing(req, resp, keep)
            lines += framing_lines
        conn_line = connection_line(keep, req.version)
        if conn_line is not None:
            lines.append(conn_line)
        self.keep = keep
        head = b"HTTP/1.1 %d %s\r\n%s\r\n\r\n" % (status, resp.reason, b"\r\n".join(lines))
        self.resp_head = len(head)
        return head

    def _resp_end(self, conn: UpstreamConn) -> None:
        """The response is complete: give the connection back (or tunnel), account, go on."""
        self.conn = None
        if self.rare:
            if self.try_timer is not None:
                self.try_timer.cancel()
                self.try_timer = None
            if self.resp_frame == FRAME_TUNNEL:
                self._report(status=self.code)
                if self.req_done and asks_switch(self.req):
                    self.tunnel = Tunnel(self, conn, READ_SIZE)
                else:  # switched when nothing asked for it, or before the request ended
                    self.state.upstreams.close(conn)
                    self._abort_downstream()
                return
        self._report(self.code)
        self.state.upstreams.release(conn, self.resp.keep_alive and self.req_done and not self.up_pending)
        self.resp_done = True
        if not self.keep:
            self.closing = True
        self._finish()

    def _report(self, status: int | None = None, failure: str | None = None) -> None:
        """End the try for the cluster in force (the endpoint is the same object if it survived
        a swap), for least-request balancing and outlier detection."""
        if not self.ep_live:
            return
        self.ep_live = False
        cluster = self.cluster
        snap = self.rt.snapshot
        if snap is not self.snap:
            cluster = snap.clusters.get(cluster.name, cluster)
        cluster.finish(self.ep, self.reactor.now * 1000, status, failure)

    def _drop_upstream(self, report: bool = False) -> None:
        """Close this try's connection (mid-exchange it cannot be reused) or leave the queue."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            self.state.upstreams.close(conn)
        if self.pool_wait is not None:
            self.state.upstreams.cancel(self.pool_wait, self)
            self.pool_wait = None
        self.up_pending.clear()
        self.up_queued = 0
        if report:
            self._report()

    def _up_broken(self, failure: str, flag: str, detail: str, protocol: bool = False) -> None:
        """The connection failed (reset, EOF, protocol error) before the response was complete."""
        if self.resp is not None:  # mid-response: the client's response cannot be completed
            self._flag(flag, detail)
            self._drop_upstream()
            self._report(failure=failure)
            self._abort_downstream()
        elif protocol:
            self._flag(flag, detail)
            self._drop_upstream()
            self._report(status=502)
            self._local_reply(502, PROTOCOL_ERROR_BODY)
        else:
            self._try_failed(failure, flag, detail)

    def _try_failed(self, failure: str, flag: str, detail: str) -> None:
        """A try ended without a response: retry (the keep-alive race, or the policy) or answer."""
        conn = self.conn
        reused = conn is not None and conn.reused
        self._drop_upstream()
        self.rare = True
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self._report(failure=failure)
        self.detail = detail
        if race_retry(failure, reused, self.up_got, self.race_retried, self.body is not None):
            self.race_retried = True  # the server closed a kept-alive connection as we sent: once more
            self.attempts -= 1  # not a retry: the request never reached the server
            self._attempt(None)
            return
        if self._retry_allowed(None, failure):
            self._schedule_retry()
            return
        self._flag(flag)
        self._local_reply(*failure_reply(failure, detail))

    def _retry_allowed(self, status: int | None, failure: str | None) -> bool:
        """The route's retry policy (policy.py) and the cluster's retry budget."""
        verdict = retry_verdict(self.plan.retry, self.body is not None, self.retries, status, failure)
        if verdict != YES:
            if verdict == EXHAUSTED:
                self._flag("URX")
            return False
        if not self.retry_held:
            if not self.cluster.pool.retries.try_acquire():
                self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_retry_overflow"))
                return False
            self.rare = True
            self.retry_held = 1
        return True

    def _schedule_retry(self) -> None:
        self.rare = True
        self.retries += 1
        self.tried += (self.ep,)
        self.resp = None
        self.code = 0
        self.resp_bytes = self.resp_head = 0
        self.resp_frame = FRAME_AS_IS
        self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_retry"))
        delay = self.plan.retry.backoff_ms(self.retries, self.rt.rng.random())
        self.wait_timer = self.reactor.call_later(delay / 1000, self._retry_now)

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if self.req is not None and self.conn is not None and self.resp is None:
            self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_per_try_timeout"))
            self._try_failed(TIMEOUT, "UT", "per_try_timeout")

    def _on_route_timeout(self) -> None:
        self.route_timer = None
        if self.req is None or self.resp_done:
            return
        self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_timeout"))
        self._flag("UT")
        self._drop_upstream()
        self._report(failure=TIMEOUT)
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        if self.resp is not None:
            self._abort_downstream()
        else:
            self._local_reply(504, TIMEOUT_BODY)

    # --- endings ---------------------------------------------------------------------------------

    def _local_reply(self, status: int, body: bytes = b"", fields: tuple[bytes, ...] | list[bytes] = (),
                     close: bool = False) -> None:
        """Answer the current request from the proxy (no upstream response was or will be sent)."""
        self.code = status
        req = self.req
        if not self.req_done and not close:
            self._skip_body()
        keep = not close and keep_alive(req, self.req_done, self.rt.draining)
        if self.md and self.md_out is None:
            fields = [*fields, *self.state.md_fields]
        data = local_reply(status, body, fields, keep, req.version)
        self.resp_head = len(data) - len(body)
        self.resp_bytes = len(body)
        self.resp_done = True
        if not keep:
            self.closing = True
        self._send_down(data)
        self._finish()

    def _skip_body(self) -> None:
        """Drop the rest of a locally answered request's body, as far as it is already here."""
        if self.req.expect_continue:
            return  # the client waits for a 100 that will not come: the connection closes instead
        parser = self.parser
        try:
            while True:
                ev = parser.next_event()
                if ev.__class__ is Data:
                    self.req_bytes += len(ev.data)
                elif ev.__class__ is EndOfMessage:
                    self.req_done = True
                    return
                else:
                    return
        except HTTPError:
            return

    def _abort_downstream(self) -> None:
        """The response cannot be completed: account and close the client's connection."""
        self._account()
        self.close()

    def _finish(self) -> None:
        """The exchange is over: account, then serve the next (pipelined) request or close."""
        self._account()
        if self.closing:
            self._close_after_flush()
        elif not self.in_pump:
            if self.d_eof or self.parser.buffered:  # a pipelined request, or the client's FIN, waits
                self._pump_down()
            if self.d_readable and not self.closed:
                self._read_down()

    def _account(self) -> None:
        """Stats and access log for the current request, then clear it."""
        req = self.req
        if req is None:
            return
        if self.rare:
            self._cancel_timers()
            if self.pipe is not None:  # a body abandoned halfway through the pipe
                pump.give_pipe(self.pipe, not self.piped)
                self.pipe = None
            if self.retry_held:
                self.cluster.pool.retries.release()
            if asks_switch(req):
                with contextlib.suppress(RuntimeError):
                    self.parser.resume()  # the upgrade was refused (or failed): HTTP goes on
        if self.conn is not None or self.ep_live or self.pool_wait is not None:
            self._drop_upstream(report=True)
        cluster = self.cluster
        if cluster is not None:
            cluster.pool.requests.release()
        rt = self.rt
        now = self.reactor.now
        flags = join_flags(self.flags) if self.flags else "-"
        duration = (now - self.t0) * 1000
        key = self.skey
        if key is not None:
            peer = self.peer_md
            if peer is not None:
                key = peer.keys.get(key) or peer.key(rt.stats, key)
            peer_id = self.principal or self.up_id  # inbound: the client; outbound: the server
            if peer_id:
                key = rt.stats.mutual_tls(key, peer_id)
            rt.stats.record_request(key, self.code, flags, duration, len(self.head) + self.req_bytes,
                                    self.resp_head + self.resp_bytes)
        if rt.access_log.enabled:
            self._log(req, flags, duration)
        self.last = now
        self._reset()

    def _log(self, req: Request, flags: str, duration: float) -> None:
        hdict = self.hdict
        ep = self.ep
        cluster = self.cluster
        self.rt.access_log.log(
            start_time=self.wall0, method=req.method, path=req.target,
            protocol="HTTP/1.1" if req.version == b"1.1" else "HTTP/1.0", response_code=self.code,
            response_flags=flags, bytes_received=self.req_bytes, bytes_sent=self.resp_bytes,
            duration_ms=duration, upstream_service_time=None, x_forwarded_for=hdict.get(b"x-forwarded-for"),
            user_agent=hdict.get(b"user-agent"), request_id=self.rid or None, authority=req.host,
            upstream_host=ep.key if ep is not None and self.attempts else None,
            upstream_cluster=cluster.name if cluster is not None else None,
            downstream_remote_address=self.peer_str, downstream_local_address=self.local_str,
            route_name=self.plan.name if self.plan is not None else None,
            upstream_transport_failure_reason=self.detail)

    def _cancel_timers(self) -> None:
        for timer in (self.route_timer, self.try_timer, self.wait_timer):
            if timer is not None:
                timer.cancel()
        self.route_timer = self.try_timer = self.wait_timer = None

    def _mirror(self) -> None:
        """Fire-and-forget copies to the route's sampled mirrors (mirror.py)."""
        plan = self.plan
        mirror(self.state, plan.mirrors, self.snap.clusters, self.rt.rng, self.req.method, self.head,
               self.body, plan.timeout)
