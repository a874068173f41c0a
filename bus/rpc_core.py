"""Sans-IO request/reply rules: the client's retries, timeouts and reply matching, and the
server's request validation and once-only execution (no sockets, no clock reads).

The shells in `bus/rpc.py` feed events in (a call, reply frames, `tick(now)`) and carry out the
actions that come back (`Send` frames, deliver a `Done`), the way `bus/clone.py` serves pub/sub.
A retry resends the same request id, so the server's reply cache answers it without running the
handler again; a reply that matches no pending call (late, duplicate, garbage) is dropped.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bus import envelope as E
from bus.envelope import DecodeError

REPLY_CACHE = 1024


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


class RpcTimeout(Exception):
    """No reply after every retry."""


@dataclass(frozen=True)
class Send:
    """Send `frames` (a request); `attempt` is 0 for the first try, n for the n-th retry."""

    req_id: bytes
    method: str
    frames: list[bytes]
    attempt: int


@dataclass(frozen=True)
class Done:
    """A call is over: `value` on a reply, or `error` (RpcError, RpcTimeout). `replied` says
    whether a reply ended it (for the received-frames metric)."""

    req_id: bytes
    method: str
    value: Any
    error: Exception | None
    replied: bool = True
    context: Any = None  # what the shell gave `start` (the async client's callback)


@dataclass
class _Call:
    method: str
    frames: list[bytes]
    timeout: float
    retries: int
    deadline: float
    context: Any = None
    attempt: int = 0


class RpcCalls:
    """The client's pending calls. `start` a call, feed `on_reply` every frame set the socket
    receives and `tick(now)` at `next_deadline()`; each returns the actions to carry out."""

    def __init__(self, origin: str = "", timeout: float = 2.0, retries: int = 2, *,
                 max_body: int = E.MAX_REPLY_BODY, new_id: Callable[[], bytes] = lambda: os.urandom(8),
                 target: str = "") -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("need timeout > 0 and retries >= 0")
        self.origin, self.timeout, self.retries = origin, timeout, retries
        self.max_body = max_body
        self.target = target  # named in timeout errors (the endpoint)
        self._new_id = new_id
        self._calls: dict[bytes, _Call] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def start(self, method: str, body: Any, now: float, timeout: float | None = None,
              retries: int | None = None, context: Any = None) -> Send:
        """A new call; the returned Send is its first attempt. `context` comes back in its Done."""
        req_id = self._new_id()
        frames = E.make(method, E.REQUEST, body, req_id=req_id, origin=self.origin).frames()
        timeout = self.timeout if timeout is None else timeout
        call = _Call(method, frames, timeout, self.retries if retries is None else retries,
                     now + timeout, context)
        self._calls[req_id] = call
        return Send(req_id, method, frames, 0)

    def on_reply(self, frames: list[bytes]) -> Done | None:
        """A frame set from the server: the call it ends, or None (garbage, late or duplicate:
        garbage cannot come from an authenticated server, and a late reply's call is over)."""
        try:
            reply = E.decode(frames, self.max_body)
        except DecodeError:
            return None
        if reply.kind not in (E.REPLY, E.ERROR) or reply.req_id not in self._calls:
            return None
        call = self._calls.pop(reply.req_id)
        try:
            value = reply.value()
        except DecodeError as exc:
            return Done(reply.req_id, call.method, None, RpcError(f"undecodable reply: {exc.reason}"),
                        context=call.context)
        if reply.kind == E.ERROR:
            return Done(reply.req_id, call.method, None, RpcError.from_reply(value), context=call.context)
        return Done(reply.req_id, call.method, value, None, context=call.context)

    def tick(self, now: float, last_error: str | None = None) -> list[Send | Done]:
        """Resend every call whose attempt timed out, or give it up after its last retry.
        `last_error` is what the shell knows about the connection (a refused handshake), for
        the timeout's message."""
        actions: list[Send | Done] = []
        for req_id, call in list(self._calls.items()):
            if now < call.deadline:
                continue
            if call.attempt < call.retries:
                call.attempt += 1
                call.deadline = now + call.timeout
                actions.append(Send(req_id, call.method, call.frames, call.attempt))
                continue
            del self._calls[req_id]
            reason = f" ({last_error})" if last_error else ""
            actions.append(Done(req_id, call.method, None, RpcTimeout(
                f"{call.method} to {self.target}: no reply after {call.attempt + 1} attempts{reason}"),
                replied=False, context=call.context))
        return actions

    def next_deadline(self) -> float | None:
        """When `tick` has something to do (None: nothing pending)."""
        return min((c.deadline for c in self._calls.values()), default=None)

    def forget(self, req_id: bytes | None = None) -> None:
        """Drop one call (its caller stopped waiting), or every call (the client closes)."""
        if req_id is None:
            self._calls.clear()
        else:
            self._calls.pop(req_id, None)


@dataclass(frozen=True)
class Incoming:
    """A valid request to dispatch; `cache_key` names it for `ServedReplies`."""

    request: E.Envelope
    cache_key: tuple[bytes, bytes]


def parse_request(identity: bytes, frames: list[bytes]) -> Incoming:
    """The server's check of a ROUTER frame set (after the identity frame); DecodeError if bad."""
    req = E.decode(frames, E.DEFAULT_MAX_BODY)
    if req.kind != E.REQUEST or not req.req_id:
        raise DecodeError("bad_kind", f"{req.kind} on a request socket")
    return Incoming(req, (identity, req.req_id))


class ServedReplies:
    """The last replies per (client identity, request id): a retried request is answered again
    from here, not executed twice. Bounded; the oldest go first."""

    def __init__(self, size: int = REPLY_CACHE) -> None:
        self.size = size
        self._replies: OrderedDict[tuple[bytes, bytes], list[bytes]] = OrderedDict()

    def get(self, key: tuple[bytes, bytes]) -> list[bytes] | None:
        return self._replies.get(key)

    def put(self, key: tuple[bytes, bytes], reply: list[bytes]) -> None:
        self._replies[key] = reply
        if len(self._replies) > self.size:
            self._replies.popitem(last=False)
