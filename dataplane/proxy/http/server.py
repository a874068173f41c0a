"""The sidecar's L7 engine: Envoy's HTTP connection manager and router for HTTP/1.1, one
`HttpConnection` per accepted downstream socket. This module is the I/O shell of the client side;
the rules live in sans-IO modules, one job each:

* exchange_state.py: the exchange's states (h11's roles and states, table-driven): the shell reports
  each milestone and asks whether the next request may start, the upstream be reused, or close;
* exchange.py: framing, keep-alive, 100-continue, upgrades, the forwarded heads, local replies;
* filters.py: the per-request stages as an ordered chain (peer metadata, upgrade verdicts,
  authorization, route selection), each returning continue or a `LocalReply`;
* router.py: per-route plans and the router's decisions (redirects, direct responses, weighted
  pick, rewrites, header operations, faults); policy.py: retries and failure replies;
* forward.py: the upstream half of the exchange (tries, pooled connections from upstream.py,
  the response back, a pipe for large bodies via pump.py); tunnel.py after a protocol switch;
  mirror.py: mirrored requests; state.py: what a runtime's connections share.

Per request (pipelined ones are answered in order, one at a time): take `runtime.snapshot` (the
request finishes on it even if a config swap replaces it meanwhile), run the listener's filters,
then forward over a pooled keep-alive connection, streaming bodies both ways. Retries follow the
route's RetryPolicy (with Envoy's previous-hosts avoidance and the cluster's retry budget); a
request that fails on a reused connection before any response byte is retried once more,
transparently, as Envoy does for the keep-alive race. Every try is reported to the cluster for
outlier detection.

What it needs from the Runtime (dataplane.proxy.runtime): `reactor`, `snapshot` (`routes`,
`clusters`, `config`), `stats`, `access_log`, `rng`, `draining`; it keeps its shared state
(`HttpState`: pools, plans, live connections) on the runtime as `runtime.http`.

Why it is shaped this way (the hot path is the point of this module):

* The exchange's data lives in the connection's slots (its states in `x`), reset per request: no
  per-request objects beyond what the codec returns, and fields only unusual requests touch are
  cleared only after one (`rare`). Each upstream try is bound by pointing the upstream fd's
  reactor callback at this connection (`set_callback`, no syscall); sockets are registered
  edge-triggered once, so steady traffic makes no epoll_ctl calls at all.
* What depends only on the route or the cluster (header operations as bytes, the resolved
  cluster and its stats key, whether anything special applies) is computed once per route per
  config (router.Plan), and a connection remembers its last routing decision, so a keep-alive
  client asking the same Host again skips routing. The filter chain is a tuple of functions
  chosen once per listener direction. The usual request then costs one dict of its fields,
  one list comprehension for the forwarded head and one write; a response read in one recv
  (head, body, end) goes back in one write.
* Back-pressure: a side is read only while what the proxy holds for its peer is under
  MAX_BUFFER (a short write stops reading the other side until the EPOLLOUT edge), so a
  connection holds at most that plus one read per direction, whatever the peers do. Request
  bodies up to RETRY_BUFFER are kept for retries and mirrors; bigger ones stream and are not
  retried. The rest of a large Content-Length response body moves socket to pipe to socket
  with splice, never through Python (forward.py, pump.py).
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
peer's, from a request (inbound, filters.py) or a response (outbound) go through the worker's
PeerCache to a `Peer` whose stats keys are cached per route key; an inbound request that carried
metadata is answered with ours. Peers' metadata fields are always dropped, so apps never see them.

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

from dataplane.proxy import peer_metadata, pump, routing, tls
from dataplane.proxy.cluster import Endpoint
from dataplane.proxy.flags import DI, SI
from dataplane.proxy.flags import join as join_flags
from dataplane.proxy.http import exchange_state as xs
from dataplane.proxy.http import filters, hopbyhop, router, target
from dataplane.proxy.http.codec import (
    CLOSED,
    NEED_DATA,
    Data,
    EndOfMessage,
    HTTPError,
    Request,
    RequestParser,
)
from dataplane.proxy.http.exchange import (
    FRAME_AS_IS,
    LocalReply,
    asks_switch,
    forward_fields,
    forward_head,
    keep_alive,
    local_reply,
    skip_body,
    wants_continue,
)
from dataplane.proxy.http.forward import MAX_BUFFER, READ_SIZE, Forwarding
from dataplane.proxy.http.mirror import mirror
from dataplane.proxy.http.options import DEFAULT, HttpOptions
from dataplane.proxy.http.policy import (
    OVERFLOW_BODY,
)
from dataplane.proxy.http.router import Forward, Plan
from dataplane.proxy.http.serialize import CONTINUE, error_response, last_chunk
from dataplane.proxy.http.state import http_state, request_id
from dataplane.proxy.http.tunnel import Tunnel
from dataplane.proxy.http.upstream import EndpointPool
from dataplane.proxy.reactor import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor, Timer
from dataplane.proxy.routing import HeaderOps
from dataplane.proxy.stats import DESTINATION, SOURCE

RETRY_BUFFER = 65536  # request bodies up to this size are kept for retries and mirrors
LINGER = 2.0  # a closing connection drops what the client still sends for this long, then closes

_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_ENDING = EPOLLRDHUP | EPOLLHUP | EPOLLERR  # a FIN or reset waits behind the data: read until it shows

_PEER_MD = peer_metadata.HEADER


class HttpConnection(Forwarding):
    """One accepted downstream HTTP/1.1 connection, and the request it is serving.

    `direction` "outbound" routes by Host with `runtime.snapshot.routes[route_port]`; "inbound"
    sends everything to `inbound_cluster` (the local app). `peer` and `local` are the client's
    and the (original destination) local address; `initial` is what was read while sniffing.
    """

    __slots__ = (
        "attempts", "authority", "body", "body_size", "c_auth", "c_plan", "c_snap", "chain", "closed",
        "cluster", "code", "conn", "d_ending", "d_eof", "d_pending", "d_read", "d_readable",
        "d_write", "detail", "direction", "ep", "ep_live", "fd",
        "flags", "hash_key", "hdict", "head", "head_timer", "in_pump",
        "inbound_cluster", "last", "linger_timer", "local", "local_str", "md", "md_out", "opts",
        "parser", "peer", "peer_md", "peer_str", "pipe", "piped", "plan", "pool_wait", "principal",
        "race_retried", "rare", "reactor", "reporter",
        "req", "req_bytes", "resp", "resp_bytes", "resp_frame", "resp_head",
        "resp_ops", "retries", "retry_held", "rid", "route_port", "route_timer", "rt", "sent_at", "skey",
        "snap", "sock", "splice_left", "state", "t0", "tried", "try_timer", "tunnel", "up_cb", "up_ending",
        "up_got", "up_hold", "up_id", "up_pending", "up_queued", "up_readable", "wait_timer", "wall0", "x",
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
        self.closed = self.in_pump = False
        self.x = xs.Exchange()  # the exchange's states (exchange_state.py): what may happen next
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
        self.ep_live = False
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
        x = self.x
        try:
            while x.server < xs.MUST_CLOSE:
                if x.client == xs.IDLE:
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
                        x.event(xs.CLIENT_CLOSED)
                        self.close()
                    return
                if x.client != xs.SEND_BODY or self.conn is None or self.up_queued >= MAX_BUFFER:
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
        if self.x.server == xs.SWITCHED:
            self.tunnel.resume_up()
        elif self.req is None and self.x.must_close():
            self._linger()
        elif self.conn is not None and self.up_readable:
            self._read_up()

    def _on_head_timeout(self) -> None:
        self.head_timer = None
        if self.x.client == xs.IDLE and self.x.server == xs.IDLE and not self.closed:
            self.x.refuse_head()
            self._send_down(error_response(408, "request header timeout"))
            self._close_after_flush()

    def check_idle(self, now: float, draining: bool) -> None:
        """The sweep: close a keep-alive connection idle too long (or any idle one when draining);
        end a request whose body stopped coming (no timer per request: `last` is the last read)."""
        x = self.x
        if x.server == xs.SWITCHED:
            if now - self.last >= self.opts.idle_timeout:
                self.tunnel.close()
        elif self.req is not None:
            if x.client == xs.SEND_BODY and now - self.last >= self.opts.stream_idle_timeout:
                self._flag(SI, "stream_idle_timeout")  # Envoy's: 408 before a response, else a reset
                self._drop_upstream(report=True)  # mid-request: never back to the pool
                if x.server == xs.SEND_RESPONSE:
                    self._local_reply(408, b"stream timeout", close=True)
                else:
                    self._abort_downstream()
        elif not x.must_close() and self.head_timer is None and (
                draining or now - self.last >= self.opts.idle_timeout):
            self.close()

    def _bad_request(self, err: HTTPError) -> None:
        """The codec refused the client's bytes: its status, then close."""
        if self.req is None:
            self.x.refuse_head()
            self._send_down(error_response(err.status, err.reason))
            self._close_after_flush()
            return
        self.x.event(xs.CLIENT_ERROR)
        if self.x.server == xs.SEND_RESPONSE:
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
        """The exchange must close (`x.must_close()`): once the client has what is queued for it."""
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
        self.x.event(xs.REQUEST)
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
            self.x.event(xs.INFORMATIONAL)
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
        if self.req is None or self.closed:
            return
        if decision.abort is not None:
            self._reply(decision.abort)
        else:
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
            self.rare = True  # the response may switch protocols: _response_head looks
            self.x.event(xs.PROPOSE)
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
        self.x.event(xs.REQUEST_END)
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

    # --- endings ---------------------------------------------------------------------------------

    def _local_reply(self, status: int, body: bytes = b"", fields: tuple[bytes, ...] | list[bytes] = (),
                     close: bool = False) -> None:
        """Answer the current request from the proxy (no upstream response was or will be sent)."""
        self.code = status
        req = self.req
        x = self.x
        if x.client == xs.SEND_BODY and not close and not req.expect_continue:  # (Expect: no 100 comes,
            dropped, ended = skip_body(self.parser)  # so the connection closes) the rest of the body
            self.req_bytes += dropped
            if ended:
                x.event(xs.REQUEST_END)
        keep = not close and keep_alive(req, x.request_complete(), self.rt.draining)
        x.event(xs.RESPONSE if keep else xs.RESPONSE_CLOSE)
        x.event(xs.RESPONSE_END)
        if self.md and self.md_out is None:
            fields = [*fields, *self.state.md_fields]
        data = local_reply(status, body, fields, keep, req.version)
        self.resp_head = len(data) - len(body)
        self.resp_bytes = len(body)
        self._send_down(data)
        self._finish()

    def _abort_downstream(self) -> None:
        """The response cannot be completed: account and close the client's connection."""
        self.x.event(xs.SERVER_ERROR)
        self._account()
        self.close()

    def _finish(self) -> None:
        """The exchange is over: account, then serve the next (pipelined) request or close."""
        self._account()
        if not self.x.next_cycle():
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
