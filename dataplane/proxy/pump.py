"""The byte pump shared by the L4 forwarder (tcp.py) and the L7 engine (http/): `Way`, one
direction of a stream (read a source, write a destination, never hold more than one read), used
by tcp.py for both halves of a connection and by http/tunnel.py after a protocol switch; and the
splice loop with its pool of pipes, which moves bytes socket -> pipe -> socket in the kernel, never
through Python (a `Way` in bulk, and a large Content-Length response body in http/forward.py).
tcp.py's docstring has the measurements behind when to copy and when to splice.

`splice` is sans-IO in the sense that matters here: it holds no state (the caller keeps the pipe,
what sits in it and what is left) and says why it stopped, so each caller maps the outcome to its
own rules (half-close for a `Way`, the response's end or Envoy's flags for L7).

A `Way` reports to its owner through two calls, so each owner keeps its own rules:
`owner.way_ended(way)` once the source's FIN has been passed on (shutdown(SHUT_WR) of the
destination), and `owner.way_failed(way, exc, reading)` when a read or a write raised.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
from typing import Any

from dataplane.proxy import tls
from dataplane.proxy.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
_readv = os.readv
_write = os.write
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_ENDING = EPOLLRDHUP | EPOLLHUP | EPOLLERR  # a FIN or reset is queued behind whatever data is left

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


class Way:
    """One direction of a stream: read `src`, write `dst` (raw fds, or OpenSSL for a TLS side),
    never holding more than one read.

    * Copy mode reads into `buf` (the reactor's scratch buffer: no allocation per read) until the
      kernel has nothing more (a short read, or EAGAIN). A short read proves the source drained but
      not that no FIN or reset waits behind it, which raises no further edge: once an event carried
      RDHUP/HUP/ERR the owner sets `ending`, and the way reads on until the end shows.
    * When `dst` cannot take it all, the way keeps the rest (`pending`), marks itself `blocked` and
      `halted` (the owner ignores the source's IN edges) and stops reading: the kernel stops ACKing
      the sender once the source's receive buffer fills (back-pressure). The owner calls `pump`
      again on `dst`'s EPOLLOUT edge, which the kernel only raises after a write found it full.
    * With `splice`, the first read that fills `buf` (the sender has more queued than one buffer
      holds) switches the way to splice mode for good, when a pipe of useful size is available
      (never with a TLS side: those bytes go through OpenSSL).
    * A read of 0 (FIN) is passed on as shutdown(SHUT_WR) once everything is flushed; then the
      owner's `way_ended`.
    """

    __slots__ = ("blocked", "dst", "dst_fd", "ending", "eof", "flushes", "halted", "nbytes", "owner", "peer",
                 "pending", "pipe", "piped", "pump", "read", "size", "splice", "src_fd", "view", "write")

    def __init__(self, owner: Any, src: Any, dst: Any, buf: bytearray | memoryview,
                 splice: bool = False) -> None:
        self.owner = owner
        self.peer: Way = self  # the other direction, whose dst is this one's src (set by the owner)
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.view = view = memoryview(buf)
        self.size = len(view)
        # read() -> n into `buf`, write(data) -> n: the raw fds, or OpenSSL for a TLS side
        self.read = (functools.partial(src.recv_into, view) if tls.is_tls(src)
                     else functools.partial(_readv, self.src_fd, [buf]))
        self.write = dst.send if tls.is_tls(dst) else functools.partial(_write, self.dst_fd)
        self.splice = splice and not (tls.is_tls(src) or tls.is_tls(dst))
        self.pump = self._pump_copy  # the current mode's: copy, or splice once in bulk
        self.pending = b""      # copy mode: what dst did not take yet
        self.pipe: tuple[int, int] | None = None
        self.piped = 0          # splice mode: bytes sitting in the pipe
        self.blocked = False    # dst is full: wait for its EPOLLOUT edge
        self.eof = False        # src sent FIN (or the way was released)
        self.halted = False     # blocked or eof: ignore src's IN edges
        self.ending = False     # src's FIN/reset has arrived: read until it shows, short reads or not
        self.nbytes = 0         # read from src (and `send`)
        self.flushes = 0        # writes of held data: progress an idle check must see too

    def on_event(self, mask: int) -> None:
        """Events of src's fd: IN feeds this way, OUT resumes the peer way (src is its dst)."""
        if mask & EPOLLOUT and self.peer.blocked:
            self.peer.pump()
        if mask & _ENDING:
            self.ending = True  # no edge will come for it again, even if it sits behind data
        if mask & _IN and not self.halted:
            self.pump()

    def send(self, data: bytes) -> None:
        """Write bytes the owner already holds (what a parser read past a protocol switch) ahead of
        anything read from src; what dst does not take waits, as a short write's rest would."""
        self.nbytes += len(data)
        try:
            n = self.write(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.owner.way_failed(self, e, False)
            return
        if n < len(data):
            self.pending = data[n:]
            self.blocked = self.halted = True

    def _pump_copy(self) -> None:
        write = self.write
        if self.blocked:
            pending = self.pending
            try:
                sent = write(pending)
            except BlockingIOError:
                return
            except OSError as e:
                self.owner.way_failed(self, e, False)
                return
            self.flushes += 1
            if sent < len(pending):
                self.pending = pending[sent:]
                return
            self.pending = b""
            self.blocked = False
            if self.eof:
                self._finish()
                return
            self.halted = False
        read = self.read
        view = self.view
        size = self.size
        while True:
            try:
                n = read()
            except BlockingIOError:
                return
            except OSError as e:
                self.owner.way_failed(self, e, True)
                return
            if not n:
                self.eof = self.halted = True
                self._finish()
                return
            self.nbytes += n
            try:
                sent = write(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self.owner.way_failed(self, e, False)
                return
            if sent < n:
                self.pending = view[sent:n].tobytes()
                self.blocked = self.halted = True
                return
            if n < size and not self.ending:
                return  # a short read from a stream socket: its receive queue is empty
            if self.splice:  # bulk: decide once, splice from now on (or copy for good)
                self.splice = False
                pipe = take_pipe()
                if pipe is not None:
                    self.pipe = pipe
                    self.pump = self._pump_splice
                    self._pump_splice()
                    return

    def _pump_splice(self) -> None:
        piped = self.piped
        n, self.piped, outcome, err = splice(self.src_fd, self.dst_fd, self.pipe,  # type: ignore[arg-type]
                                             piped, UNBOUNDED)
        if self.piped != piped or n:
            self.flushes += 1
        self.nbytes += n
        if outcome == BLOCKED:
            self.blocked = self.halted = True
        elif outcome == DRAINED:
            self.blocked = self.halted = False
        elif outcome == EOF:
            self.blocked = False
            self.eof = self.halted = True
            self._finish()
        else:
            self.owner.way_failed(self, err, outcome == READ_FAILED)

    def _finish(self) -> None:
        """src said FIN and everything is flushed: pass the FIN on."""
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.owner.way_ended(self)

    @property
    def done(self) -> bool:
        """The source ended and all it sent is through."""
        return self.eof and not self.blocked

    def buffered(self) -> int:
        return len(self.pending) + self.piped

    def release(self) -> None:
        """The connection closes: stop, and give the pipe back (reused only if empty)."""
        self.eof = self.halted = True
        self.blocked = False
        if self.pipe is not None:
            give_pipe(self.pipe, self.piped == 0)
            self.pipe = None
