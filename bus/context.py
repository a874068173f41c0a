"""The process-wide ZeroMQ context, sized for thousands of sockets."""

from __future__ import annotations

import os
import threading

import zmq

_lock = threading.Lock()
_ctx: zmq.Context | None = None


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
