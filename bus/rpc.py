"""Request/reply over DEALER/ROUTER: CSRs, ACK/NACK, registrations, policy checks.

Every request carries an id. The client waits up to `timeout`, retries at most
`retries` times with the same id, and ignores stale replies. The server keeps the
last replies per peer, so a retried request is answered again, not executed twice.
A handler's exception becomes an ERROR reply; the server keeps serving. A handler that refuses
the caller raises `Refused`: the ERROR reply is {"error": reason, "detail": ...}, counted and
logged, with no traceback (a refusal is the handler working, not failing).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import envelope as E
from bus.context import socket
from bus.envelope import DecodeError
from bus.keys import Keyring
from bus.logs import BurstLog, Log
from bus.loop import Loop, drain
from bus.metrics import AUTH_FAILURES, RECEIVED, RPC_FAILURES, RPC_REFUSED, RPC_RETRIES, SENT
from bus.monitor import Monitor, close_monitor, explain, open_monitor
from bus.pubsub import Rejects, bind
from bus.security import secure_client, secure_server

_REPLY_CACHE = 1024


@dataclass(frozen=True)
class Request:
    method: str
    body: Any
    peer: str  # the client's key name from ZAP ("" on ipc://)
    origin: str


Handler = Callable[[Request], Any]


class RpcError(Exception):
    """The server answered with an error; `code` is its `error` field (e.g. "not_owner")."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_reply(cls, body: Any) -> RpcError:
        body = body if isinstance(body, dict) else {}
        code = str(body.get("error", "error"))
        detail = body.get("detail")
        return cls(f"{code}: {detail}" if detail else code, code)


class Refused(Exception):
    """Raised by a handler to refuse the caller: `reason` is the reply's `error` and a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RpcTimeout(Exception):
    """No reply after every retry."""


class RpcServer:
    def __init__(self, loop: Loop, endpoint: str, keyring: Keyring | None,
                 handlers: dict[str, Handler], name: str = "rpc") -> None:
        self.loop = loop
        self.handlers = handlers
        self.log = Log("bus.rpc-server", name=name)
        self._reject = Rejects(self.log)
        self._refusals = BurstLog(self.log)
        self._replies: OrderedDict[tuple[bytes, bytes], list[bytes]] = OrderedDict()
        self._sock = loop.socket(zmq.ROUTER, E.DEFAULT_MAX_BODY)
        secure_server(self._sock, endpoint, keyring)
        self.endpoint = bind(self._sock, endpoint)
        self.monitor = Monitor(loop, self._sock, "rpc-server", "server", self.log)
        loop.add_reader(self._sock, self._on_request)
        loop.on_close(self.close)

    def close(self) -> None:
        self.monitor.close()
        self.loop.remove_reader(self._sock)
        self._sock.close(0)

    def _on_request(self) -> None:
        for frames in drain(self._sock, copy=False):
            if len(frames) != 4:
                self._reject("frame_count", f"request with {len(frames)} frames")
                continue
            try:
                peer = frames[1].get("User-Id") or ""
            except zmq.ZMQError:  # ipc:// has no ZAP: the socket file's mode is the access check
                peer = ""
            identity = frames[0].bytes
            try:
                req = E.decode([f.bytes for f in frames[1:]], E.DEFAULT_MAX_BODY)
                if req.kind != E.REQUEST or not req.req_id:
                    raise DecodeError("bad_kind", f"{req.kind} on a request socket")
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail, peer=peer)
                continue
            RECEIVED.labels(E.REQUEST).inc()
            cache_key = (identity, req.req_id)
            reply = self._replies.get(cache_key)
            if reply is None:
                reply = self._handle(req, peer).frames()
                self._replies[cache_key] = reply
                if len(self._replies) > _REPLY_CACHE:
                    self._replies.popitem(last=False)
            try:
                self._sock.send_multipart([identity, *reply], zmq.NOBLOCK)
                SENT.labels(E.REPLY).inc()
            except zmq.ZMQError:
                pass  # the client is gone; its retry will find the cached reply

    def _handle(self, req: E.Envelope, peer: str) -> E.Envelope:
        handler = self.handlers.get(req.topic)
        if handler is None:
            return E.make(req.topic, E.ERROR, {"error": f"unknown method {req.topic!r}"},
                          req_id=req.req_id)
        try:
            result = handler(Request(req.topic, req.value(), peer, req.origin))
            return E.make(req.topic, E.REPLY, result, req_id=req.req_id)
        except Refused as exc:
            RPC_REFUSED.labels(req.topic, exc.reason).inc()
            self._refusals.event(exc.reason, "request refused", method=req.topic, peer=peer,
                                 detail=exc.detail)
            return E.make(req.topic, E.ERROR, {"error": exc.reason, "detail": exc.detail},
                          req_id=req.req_id)
        except Exception as exc:
            self.log.error("handler failed", method=req.topic, peer=peer, exc_info=True)
            return E.make(req.topic, E.ERROR, {"error": f"{type(exc).__name__}: {exc}"},
                          req_id=req.req_id)


class RpcClient:
    """A blocking client, safe to share between threads (calls are serialised)."""

    def __init__(self, endpoint: str, keyring: Keyring | None, server: str, *,
                 origin: str = "", timeout: float = 2.0, retries: int = 2,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.origin = origin
        self.timeout = timeout
        self.retries = retries
        self.log = Log("bus.rpc-client", server=server)
        self._lock = threading.Lock()
        self._sock = socket(zmq.DEALER, E.MAX_REPLY_BODY, ctx)
        secure_client(self._sock, endpoint, keyring, server)
        self._events = open_monitor(
            self._sock, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._sock.connect(endpoint)
        self.last_error: str | None = None

    def call(self, method: str, body: Any = None, timeout: float | None = None,
             retries: int | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        req_id = os.urandom(8)
        frames = E.make(method, E.REQUEST, body, req_id=req_id, origin=self.origin).frames()
        with self._lock:
            for attempt in range(retries + 1):
                if attempt:
                    RPC_RETRIES.inc()
                    self.log.info("retrying request", method=method, attempt=attempt,
                                  reason=self.last_error or "timeout")
                try:
                    self._sock.send_multipart(frames, zmq.NOBLOCK)
                    SENT.labels(E.REQUEST).inc()
                except zmq.Again:
                    pass  # no server connected (down, or its ZAP refused us): this attempt times out
                reply = self._await(req_id, time.monotonic() + timeout)
                if reply is not None:
                    if reply.kind == E.ERROR:
                        RPC_FAILURES.labels("error").inc()
                        raise RpcError.from_reply(reply.value())
                    return reply.value()
        RPC_FAILURES.labels("timeout").inc()
        raise RpcTimeout(f"{method} to {self.endpoint}: no reply after {retries + 1} attempts"
                         + (f" ({self.last_error})" if self.last_error else ""))

    def _await(self, req_id: bytes, deadline: float) -> E.Envelope | None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(left * 1000):
                if sock is self._events:
                    self._note_handshake_failure()
                    continue
                try:
                    reply = E.decode(self._sock.recv_multipart(), E.MAX_REPLY_BODY)
                except DecodeError:
                    continue  # garbage cannot come from an authenticated server; ignore
                if reply.req_id == req_id and reply.kind in (E.REPLY, E.ERROR):
                    return reply
        return None

    def _note_handshake_failure(self) -> None:
        reason, self.last_error = explain("client", recv_monitor_message(self._events)["event"])
        AUTH_FAILURES.labels("client", reason).inc()

    def close(self) -> None:
        close_monitor(self._sock, self._events)
        self._sock.close(0)



@dataclass
class _Pending:
    frames: list[bytes]
    method: str
    on_reply: Callable[[Any, Exception | None], None] | None
    attempts: int = 0
    timer: Any = None


class AsyncRpcClient:
    """A non-blocking client for loop-driven components (proxy, node agent): `call` returns at
    once and the reply, or the RpcError / RpcTimeout, goes to `on_reply(result, error)` in the
    loop thread. A retry resends the same id, so the server's reply cache runs it once.
    A blocking RPC in a proxy would stall every connection it carries."""

    def __init__(self, loop: Loop, endpoint: str, keyring: Keyring | None, server: str, *,
                 origin: str = "", timeout: float = 2.0, retries: int = 2) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.origin = origin
        self.timeout = timeout
        self.retries = retries
        self.log = Log("bus.rpc-client", server=server)
        self._pending: dict[bytes, _Pending] = {}
        self._sock = loop.socket(zmq.DEALER, E.MAX_REPLY_BODY)
        # queue nothing for a server not connected yet: a request sent into a dead server's queue
        # would run when it comes back, after we gave up on it (a certificate signed for nothing)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        secure_client(self._sock, endpoint, keyring, server)
        self.monitor = Monitor(loop, self._sock, "rpc", "client", self.log)
        loop.add_reader(self._sock, self._on_readable)
        self._sock.connect(endpoint)

    def call(self, method: str, body: Any = None,
             on_reply: Callable[[Any, Exception | None], None] | None = None) -> None:
        """Send a request (from any thread); `on_reply` runs in the loop thread."""
        req_id = os.urandom(8)
        frames = E.make(method, E.REQUEST, body, req_id=req_id, origin=self.origin).frames()
        pending = _Pending(frames, method, on_reply)

        def start() -> None:
            self._pending[req_id] = pending
            self._send(req_id, pending)
        if self.loop.in_loop():
            start()
        else:
            self.loop.call_soon_threadsafe(start)

    def call_wait(self, method: str, body: Any = None, timeout: float = 10.0) -> Any:
        """For threads other than the loop's: block until the reply (raises as RpcClient does)."""
        done = threading.Event()
        box: list[Any] = [None, None]

        def finish(result: Any, error: Exception | None) -> None:
            box[0], box[1] = result, error
            done.set()
        self.call(method, body, finish)
        if not done.wait(timeout):
            raise RpcTimeout(f"{method} to {self.endpoint}: no reply within {timeout} s")
        if box[1] is not None:
            raise box[1]
        return box[0]

    def close(self) -> None:
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self._pending.clear()
        self.monitor.close()
        self.loop.remove_reader(self._sock)
        self._sock.close(0)

    def _send(self, req_id: bytes, pending: _Pending) -> None:
        pending.attempts += 1
        if pending.attempts > 1:
            RPC_RETRIES.inc()
            self.log.info("retrying request", method=pending.method, attempt=pending.attempts - 1,
                          reason=self.monitor.last_error or "timeout")
        try:
            self._sock.send_multipart(pending.frames, zmq.NOBLOCK)
            SENT.labels(E.REQUEST).inc()
        except zmq.Again:
            pass  # not connected yet: the timeout resends
        pending.timer = self.loop.call_later(self.timeout, lambda: self._expired(req_id))

    def _expired(self, req_id: bytes) -> None:
        pending = self._pending.get(req_id)
        if pending is None:
            return
        if pending.attempts <= self.retries:
            self._send(req_id, pending)
            return
        del self._pending[req_id]
        RPC_FAILURES.labels("timeout").inc()
        reason = f" ({self.monitor.last_error})" if self.monitor.last_error else ""
        self._finish(pending, None, RpcTimeout(
            f"{pending.method} to {self.endpoint}: no reply after {pending.attempts} attempts{reason}"))

    def _on_readable(self) -> None:
        for frames in drain(self._sock, 512):
            try:
                reply = E.decode(frames, E.MAX_REPLY_BODY)
            except DecodeError:
                continue  # garbage cannot come from an authenticated server; ignore
            pending = self._pending.pop(reply.req_id or b"", None)
            if pending is None or reply.kind not in (E.REPLY, E.ERROR):
                continue  # a stale reply to a request already answered or given up
            pending.timer.cancel()
            RECEIVED.labels(reply.kind).inc()
            if reply.kind == E.ERROR:
                RPC_FAILURES.labels("error").inc()
                self._finish(pending, None, RpcError.from_reply(reply.value()))
                continue
            try:
                value = reply.value()
            except DecodeError as exc:
                self._finish(pending, None, RpcError(f"undecodable reply: {exc.reason}"))
                continue
            self._finish(pending, value, None)

    def _finish(self, pending: _Pending, value: Any, error: Exception | None) -> None:
        if pending.on_reply is None:
            if error is not None:
                self.log.warning("request failed", method=pending.method, error=str(error))
            return
        try:
            pending.on_reply(value, error)
        except Exception:
            self.log.error("reply callback failed", method=pending.method, exc_info=True)
