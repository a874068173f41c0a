"""The process-wide ZeroMQ context, sized for thousands of sockets, and the one place sockets are made."""

from __future__ import annotations

import os
import threading
from typing import TypeVar

import zmq

from bus.envelope import frame_limit

_lock = threading.Lock()
_ctx: zmq.Context | None = None
S = TypeVar("S", bound=zmq.Socket)


def context() -> zmq.Context:
    """One context per process. MAX_SOCKETS and IO_THREADS must be set before the first socket."""
    global _ctx
    with _lock:
        if _ctx is None or _ctx.closed:
            ctx = zmq.Context()
            ctx.set(zmq.MAX_SOCKETS, int(os.environ.get("ZMESH_MAX_SOCKETS", "16384")))
            ctx.set(zmq.IO_THREADS, int(os.environ.get("ZMESH_IO_THREADS", "1")))
            _ctx = ctx
        return _ctx


def socket(kind: int, max_body: int, ctx: zmq.Context | None = None,
           cls: type[S] = zmq.Socket) -> S:  # type: ignore[assignment]
    """A socket that takes bodies up to `max_body` (an envelope limit): libzmq refuses any bigger
    frame by dropping its sender before allocating it (ZMQ_MAXMSGSIZE), where the envelope's own
    check would only see it after a 200 MB frame had been read into memory."""
    sock = cls(ctx or context(), kind)
    sock.maxmsgsize = frame_limit(max_body)
    sock.linger = 0
    return sock
