"""The upstream half of an L7 exchange (Envoy's router filter's I/O): a try on an endpoint, its
pooled connection (upstream.py), the request head and body sent, the response read and turned
into the client's (exchange.py's framing, a pipe for a large body, pump.py), and what a failed
or timed-out try leads to (policy.py: retry, the keep-alive race, or a local reply).

`Forwarding` holds no state of its own: it is the part of `server.HttpConnection` that talks to
upstreams, over the connection's slots, so the hot path stays one object with no indirection.
"""

from __future__ import annotations

from dataplane.proxy import peer_metadata, pump, sockets, tls
from dataplane.proxy.blackhole import BLACKHOLE, HTTP_BODY, HTTP_STATUS
from dataplane.proxy.cluster import CONNECT_FAILURE, RESET, TIMEOUT, Endpoint
from dataplane.proxy.http import exchange_state as xs
from dataplane.proxy.http import hopbyhop
from dataplane.proxy.http.codec import NEED_DATA, Data, EndOfMessage, HTTPError, Response, ResponseParser
from dataplane.proxy.http.exchange import (
    FRAME_AS_IS,
    FRAME_CHUNK,
    FRAME_TUNNEL,
    connection_line,
    framing,
    keep_alive,
    response_fields,
)
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
from dataplane.proxy.http.serialize import last_chunk
from dataplane.proxy.http.state import UNKNOWN_PEER
from dataplane.proxy.http.tunnel import Tunnel
from dataplane.proxy.http.upstream import BLACKHOLED, OVERFLOW, PENDING, UpstreamConn
from dataplane.proxy.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

READ_SIZE = 65536
MAX_BUFFER = 65536  # bytes held for a peer before the proxy stops reading the other side
SPLICE_MIN = 128 * 1024  # a response body with at least this much left goes through a pipe
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_ENDING = EPOLLRDHUP | EPOLLHUP | EPOLLERR  # a FIN or reset waits behind the data: read until it shows
_PEER_MD = peer_metadata.HEADER


class Forwarding:
    """Upstream tries for `server.HttpConnection` (see the module docstring)."""

    __slots__ = ()

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
        sending = self.x.client == xs.SEND_BODY
        if conn.connected and self.in_pump and sending and (req.content_length or req.chunked):
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
        if not sending:
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
        if self.x.client == xs.SEND_BODY:
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
                if eof and self.x.server != xs.SEND_RESPONSE:
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
                if ev.status >= 200 or ev.status == 101:  # 100 Continue was answered here; other 1xx dropped
                    try:
                        head = self._response_head(ev)
                    except xs.LocalProtocolError:  # a switch nobody asked for, or before the request ended
                        self._up_broken(RESET, "UPE", f"upstream_protocol_error: unrequested {ev.status}",
                                        protocol=True)
                        return False
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
        req = self.req
        x = self.x
        keep = keep_alive(req, x.request_complete(), self.rt.draining)
        frame = FRAME_AS_IS
        framing_lines: tuple[bytes, ...] = ()
        if resp.content_length is None or status == 101 or self.rare:
            self.rare = True
            frame, keep, framing_lines = framing(req, resp, keep)
        # may refuse (a 101 nobody asked for): LocalProtocolError, nothing changed
        x.event(xs.SWITCH if frame == FRAME_TUNNEL else xs.RESPONSE if keep else xs.RESPONSE_CLOSE)
        self.resp = resp
        self.code = status
        self.resp_frame = frame
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
        if framing_lines:
            lines += framing_lines
        conn_line = connection_line(keep, req.version)
        if conn_line is not None:
            lines.append(conn_line)
        head = b"HTTP/1.1 %d %s\r\n%s\r\n\r\n" % (status, resp.reason, b"\r\n".join(lines))
        self.resp_head = len(head)
        return head

    def _resp_end(self, conn: UpstreamConn) -> None:
        """The response is complete: give the connection back (or tunnel), account, go on."""
        self.conn = None
        x = self.x
        if self.rare:
            if self.try_timer is not None:
                self.try_timer.cancel()
                self.try_timer = None
            if x.server == xs.SWITCHED:  # the machine only allows a switch the request proposed
                self._report(status=self.code)
                Tunnel(self, conn, READ_SIZE)  # owns the connection from here (self.tunnel)
                return
        self._report(self.code)
        reuse = self.resp.keep_alive and x.request_complete() and not self.up_pending
        self.state.upstreams.release(conn, reuse)
        x.event(xs.RESPONSE_END)
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
        if self.x.server != xs.SEND_RESPONSE:  # mid-response: the client's response cannot be completed
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
        if self.req is not None and self.conn is not None and self.x.server == xs.SEND_RESPONSE:
            self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_per_try_timeout"))
            self._try_failed(TIMEOUT, "UT", "per_try_timeout")

    def _on_route_timeout(self) -> None:
        self.route_timer = None
        server = self.x.server
        if self.req is None or (server >= xs.DONE and server != xs.SWITCHED):
            return  # over (a tunnel is not: the route timeout applies to it as to any response)
        self.rt.stats.inc(("cluster", self.cluster.name, "upstream_rq_timeout"))
        self._flag("UT")
        self._drop_upstream()
        self._report(failure=TIMEOUT)
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        if server == xs.SEND_RESPONSE:
            self._local_reply(504, TIMEOUT_BODY)
        else:
            self._abort_downstream()
