"""Byte pumps shared by the L4 forwarder (tcp.py) and the L7 engine's large bodies (http/server.py):
the pool of pipes and the splice loop that moves bytes socket -> pipe -> socket in the kernel,
never through Python (tcp.py's docstring has the measurements behind when to splice).

`splice` is sans-IO in the sense that matters here: it holds no state (the caller keeps the pipe,
what sits in it and what is left) and says why it stopped, so each caller maps the outcome to its
own rules (half-close for L4, the response's end or Envoy's flags for L7).
"""

from __future__ import annotations

import fcntl
import os

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice

# why `splice` stopped
DRAINED = 0  # the source has nothing more now: wait for its next EPOLLIN edge
BLOCKED = 1  # the destination is full, bytes wait in the pipe: wait for its EPOLLOUT edge
EOF = 2  # the source ended (read 0) and the pipe is empty
DONE = 3  # `left` bytes came through and the pipe is empty
READ_FAILED = 4  # reading the source raised (the error is returned)
WRITE_FAILED = 5  # writing the destination raised
UNBOUNDED = 1 << 62  # `left` for a stream without a length

PIPE_SIZE = 256 * 1024  # per direction in splice mode: the most the proxy holds for one half
_MIN_PIPE = 64 * 1024
_POOL_MAX = 128
_pipe_pool: list[tuple[int, int]] = []  # empty pipes of closed connections, reused (per process)


def take_pipe() -> tuple[int, int] | None:
    """An empty pipe for splice mode, or None when the user's pipe quota only leaves tiny ones.

    An unprivileged user past fs.pipe-user-pages-soft gets 8 KiB pipes, and splicing
    through those costs more syscalls than copying: the half then stays in copy mode.
    """
    if _pipe_pool:
        return _pipe_pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    if size < _MIN_PIPE:
        os.close(r)
        os.close(w)
        return None
    return r, w


def give_pipe(pipe: tuple[int, int], empty: bool) -> None:
    if empty and len(_pipe_pool) < _POOL_MAX:
        _pipe_pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def splice(src: int, dst: int, pipe: tuple[int, int], piped: int,
           left: int) -> tuple[int, int, int, OSError | None]:
    """Move bytes `src` -> `pipe` -> `dst` until one side must be waited for, the source ends, or
    `left` bytes have come in; `piped` bytes already wait in the pipe and go first.
    Returns (bytes read from src, bytes left in the pipe, outcome, the error if one was raised)."""
    r, w = pipe
    got = 0
    while True:
        if piped:
            try:
                n = _splice(r, dst, piped, None, None, _FLAGS)
            except BlockingIOError:
                return got, piped, BLOCKED, None
            except OSError as e:
                return got, piped, WRITE_FAILED, e
            piped -= n
            if piped:
                return got, piped, BLOCKED, None
        if not left:
            return got, 0, DONE, None
        try:
            n = _splice(src, w, PIPE_SIZE if left > PIPE_SIZE else left, None, None, _FLAGS)
        except BlockingIOError:
            return got, 0, DRAINED, None
        except OSError as e:
            return got, 0, READ_FAILED, e
        if not n:
            return got, 0, EOF, None
        got += n
        piped = n
        left -= n
