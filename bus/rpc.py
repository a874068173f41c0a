"""Request/reply over DEALER/ROUTER: CSRs, ACK/NACK, registrations, policy checks.

Every request carries an id. The client waits up to `timeout`, retries at most
`retries` times with the same id, and ignores stale replies. The server keeps the
last replies per peer, so a retried request is answered again, not executed twice.
A handler's exception becomes an ERROR reply; the server keeps serving. A handler that refuses
the caller raises `Refused`: the ERROR reply is {"error": reason, "detail": ...}, counted and
logged, with no traceback (a refusal is the handler working, not failing).

Those rules live, without sockets or clocks, in `bus/rpc_core.py`; this module is the I/O around
them: sockets, polling, timers, metrics and logs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import envelope as E
from bus.context import socket
from bus.envelope import DecodeError
from bus.keys import Keyring
from bus.logs import BurstLog, Log
from bus.loop import Loop, Timer, drain
from bus.metrics import AUTH_FAILURES, RECEIVED, RPC_FAILURES, RPC_REFUSED, RPC_RETRIES, SENT
from bus.monitor import Monitor, close_monitor, explain, open_monitor
from bus.pubsub import Rejects, bind
from bus.rpc_core import Done, RpcCalls, RpcError, RpcTimeout, Send, ServedReplies, parse_request
from bus.security import secure_client, secure_server

__all__ = ["AsyncRpcClient", "Handler", "Refused", "Request", "RpcClient", "RpcError", "RpcServer",
           "RpcTimeout"]


@dataclass(frozen=True)
class Request:
    method: str
    body: Any
    peer: str  # the client's key name from ZAP ("" on ipc://)
    origin: str


Handler = Callable[[Request], Any]


class Refused(Exception):
    """Raised by a handler to refuse the caller: `reason` is the reply's `error` and a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RpcServer:
    def __init__(self, loop: Loop, endpoint: str, keyring: Keyring | None,
                 handlers: dict[str, Handler], name: str = "rpc") -> None:
        self.loop = loop
        self.handlers = handlers
        self.log = Log("bus.rpc-server", name=name)
        self._reject = Rejects(self.log)
        self._refusals = BurstLog(self.log)
        self._replies = ServedReplies()
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
                incoming = parse_request(identity, [f.bytes for f in frames[1:]])
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail, peer=peer)
                continue
            RECEIVED.labels(E.REQUEST).inc()
            reply = self._replies.get(incoming.cache_key)
            if reply is None:
                reply = self._handle(incoming.request, peer).frames()
                self._replies.put(incoming.cache_key, reply)
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


def _send(sock: zmq.Socket, send: Send, log: Log, last_error: str | None) -> None:
    """One attempt of a call; a socket that cannot take it now (no server connected, or its ZAP
    refused us) makes the attempt time out, and the core's tick retries it."""
    if send.attempt:
        RPC_RETRIES.inc()
        log.info("retrying request", method=send.method, attempt=send.attempt, reason=last_error or "timeout")
    try:
        sock.send_multipart(send.frames, zmq.NOBLOCK)
        SENT.labels(E.REQUEST).inc()
    except zmq.Again:
        pass


def _count(done: Done) -> None:
    """The metrics of a finished call."""
    if done.replied:
        RECEIVED.labels(E.ERROR if isinstance(done.error, RpcError) else E.REPLY).inc()
    if done.error is not None:
        RPC_FAILURES.labels("timeout" if isinstance(done.error, RpcTimeout) else "error").inc()


class RpcClient:
    """A blocking client, safe to share between threads (calls are serialised)."""

    def __init__(self, endpoint: str, keyring: Keyring | None, server: str, *,
                 origin: str = "", timeout: float = 2.0, retries: int = 2,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.log = Log("bus.rpc-client", server=server)
        self._calls = RpcCalls(origin, timeout, retries, target=endpoint)
        self._lock = threading.Lock()
        self._sock = socket(zmq.DEALER, E.MAX_REPLY_BODY, ctx)
        secure_client(self._sock, endpoint, keyring, server)
        self._events = open_monitor(
            self._sock, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)
        self._sock.connect(endpoint)
        self.last_error: str | None = None

    def call(self, method: str, body: Any = None, timeout: float | None = None,
             retries: int | None = None) -> Any:
        """The reply's value; RpcError for an error reply, RpcTimeout after the last retry."""
        with self._lock:
            first = self._calls.start(method, body, time.monotonic(), timeout, retries)
            try:
                actions: Iterable[Send | Done] = [first]
                while True:  # ends: the core gives up on the call after its last retry
                    for action in actions:
                        if isinstance(action, Send):
                            _send(self._sock, action, self.log, self.last_error)
                        elif action.req_id == first.req_id:
                            _count(action)
                            if action.error is not None:
                                raise action.error
                            return action.value
                    actions = self._wait()
            finally:
                self._calls.forget(first.req_id)

    def _wait(self) -> list[Send | Done]:
        """Block until a reply ends the call or its attempt times out (the core's next deadline)."""
        deadline = self._calls.next_deadline() or time.monotonic()
        while (left := deadline - time.monotonic()) > 0:
            for sock, _ in self._poller.poll(left * 1000):
                if sock is self._events:
                    self._note_handshake_failure()
                elif (done := self._calls.on_reply(self._sock.recv_multipart())) is not None:
                    return [done]
        return self._calls.tick(time.monotonic(), self.last_error)

    def _note_handshake_failure(self) -> None:
        reason, self.last_error = explain("client", recv_monitor_message(self._events)["event"])
        AUTH_FAILURES.labels("client", reason).inc()

    def close(self) -> None:
        close_monitor(self._sock, self._events)
        self._sock.close(0)


class AsyncRpcClient:
    """A non-blocking client for loop-driven components (proxy, node agent): `call` returns at
    once and the reply, or the RpcError / RpcTimeout, goes to `on_reply(result, error)` in the
    loop thread. A retry resends the same id, so the server's reply cache runs it once.
    A blocking RPC in a proxy would stall every connection it carries."""

    def __init__(self, loop: Loop, endpoint: str, keyring: Keyring | None, server: str, *,
                 origin: str = "", timeout: float = 2.0, retries: int = 2) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.log = Log("bus.rpc-client", server=server)
        self._calls = RpcCalls(origin, timeout, retries, target=endpoint)
        self._timer: Timer | None = None
        self._armed_for: float | None = None
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
        def start() -> None:
            self._carry([self._calls.start(method, body, time.monotonic(), context=on_reply)])
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
        if self._timer is not None:
            self._timer.cancel()
        self._calls.forget()
        self.monitor.close()
        self.loop.remove_reader(self._sock)
        self._sock.close(0)

    def _carry(self, actions: Iterable[Send | Done]) -> None:
        """Carry out the core's actions, then wake up at its next deadline."""
        for action in actions:
            if isinstance(action, Send):
                _send(self._sock, action, self.log, self.monitor.last_error)
            else:
                _count(action)
                self._finish(action)
        deadline = self._calls.next_deadline()
        if deadline == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_for = None, deadline
        if deadline is not None:
            self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._armed_for = None
        self._carry(self._calls.tick(time.monotonic(), self.monitor.last_error))

    def _on_readable(self) -> None:
        for frames in drain(self._sock, 512):
            done = self._calls.on_reply(frames)
            if done is not None:
                self._carry([done])

    def _finish(self, done: Done) -> None:
        on_reply = done.context
        if on_reply is None:
            if done.error is not None:
                self.log.warning("request failed", method=done.method, error=str(done.error))
            return
        try:
            on_reply(done.value, done.error)
        except Exception:
            self.log.error("reply callback failed", method=done.method, exc_info=True)
