"""A small reactor: ZeroMQ sockets and raw fds on epoll, timers, and calls from other threads.

ZeroMQ sockets are not thread-safe, so every bus component lives on one Loop and
other threads reach it only through `call_soon_threadsafe` / `call_sync`.

Why epoll and not zmq.Poller: zmq_poll costs O(sockets) per wake-up, and a node
agent's loop holds hundreds of them (measured: 2-4 ms a wake-up at 750 sockets).
A socket's ZMQ_FD only signals edges, and any send or recv on the socket may consume
an edge meant for pending input, so sockets created with `Loop.socket` note each use
and the loop re-checks ZMQ_EVENTS for exactly those before sleeping again.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import zmq

from bus.context import context, socket
from bus.logs import Log
from bus.metrics import LOOP_ERRORS

_DRAIN_PASSES = 8     # re-checks of a busy socket per iteration before yielding to others
_SWEEP_INTERVAL = 1.0  # belt and braces: re-check every socket's ZMQ_EVENTS this often


class Timer:
    __slots__ = ("callback", "cancelled", "interval", "when")

    def __init__(self, when: float, callback: Callable[[], Any], interval: float | None) -> None:
        self.when = when
        self.callback = callback
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class LoopSocket(zmq.Socket):
    """A zmq socket that tells its loop when it was used, so no input edge is lost."""

    _loop: Loop | None = None

    def send(self, *args: Any, **kwargs: Any) -> Any:
        self._touched()
        return super().send(*args, **kwargs)

    def send_multipart(self, *args: Any, **kwargs: Any) -> Any:
        self._touched()
        return super().send_multipart(*args, **kwargs)

    def _touched(self) -> None:
        if self._loop is not None:
            self._loop._touched.add(self)


_EVENTS = int(zmq.EVENTS)  # plain ints: pyzmq's enum arithmetic costs microseconds a message
_POLLIN = int(zmq.POLLIN)


def has_input(sock: zmq.Socket) -> bool:
    """Whether a message waits on `sock` (ZMQ_EVENTS, without reading or raising)."""
    return bool(sock.get(_EVENTS) & _POLLIN)


def drain(sock: zmq.Socket, limit: int = 512, copy: bool = True) -> Iterator[list]:
    """The messages waiting on `sock`, at most `limit`. Asks ZMQ_EVENTS instead of waiting for
    zmq.Again: an exception per drained socket costs more than the message itself. A socket
    left with input (the limit was reached) is handed back to its loop for another turn."""
    for _ in range(limit):
        if not sock.get(_EVENTS) & _POLLIN:
            return
        yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
    if isinstance(sock, LoopSocket):
        sock._touched()


class Loop:
    def __init__(self, name: str = "bus", ctx: zmq.Context | None = None) -> None:
        self.name = name
        self.ctx = ctx or context()
        self.log = Log("bus.loop", loop=name)
        self._epoll = select.epoll()
        self._by_fd: dict[int, tuple[Any, Callable[[], None]]] = {}
        self._zmq: dict[zmq.Socket, tuple[int, Callable[[], None]]] = {}
        self._touched: set[zmq.Socket] = set()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._tickers: dict[float, tuple[Timer, list[Callable[[], None]]]] = {}
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._owner: int | None = None
        self._running = False
        self._closed = False
        self._closers: list[Callable[[], None]] = []
        self._next_sweep = 0.0

    # -- sockets and registration --
    def socket(self, kind: int, max_body: int) -> zmq.Socket:
        """A socket of this loop's context whose uses the loop tracks (see the module doc), taking
        envelope bodies up to `max_body` (bus.context.socket)."""
        sock = socket(kind, max_body, self.ctx, LoopSocket)
        sock._loop = self
        return sock

    def add_reader(self, sock: zmq.Socket | int, callback: Callable[[], None]) -> None:
        if isinstance(sock, zmq.Socket):
            fd = sock.getsockopt(zmq.FD)
            self._zmq[sock] = (fd, callback)
            self._by_fd[fd] = (sock, callback)
            self._epoll.register(fd, select.EPOLLIN)
            self._touched.add(sock)  # input may already be queued: no edge will tell us
        else:
            self._by_fd[sock] = (sock, callback)
            self._epoll.register(sock, select.EPOLLIN)

    def remove_reader(self, sock: zmq.Socket | int) -> None:
        if isinstance(sock, zmq.Socket):
            entry = self._zmq.pop(sock, None)
            self._touched.discard(sock)
            if entry is None:
                return
            fd = entry[0]
        else:
            fd = sock
        if self._by_fd.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` in the loop thread when the loop stops (sockets close there)."""
        self._closers.append(closer)

    # -- timers --
    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self._add_timer(Timer(time.monotonic() + delay, callback, None))

    def call_every(self, interval: float, callback: Callable[[], Any]) -> Timer:
        return self._add_timer(Timer(time.monotonic() + interval, callback, interval))

    def add_ticker(self, interval: float, callback: Callable[[], None]) -> None:
        """Join a shared periodic timer: a thousand subscribers' ticks cost one wake-up."""
        entry = self._tickers.get(interval)
        if entry is None:
            callbacks: list[Callable[[], None]] = []

            def tick() -> None:
                for cb in list(callbacks):
                    self._guard(cb)

            entry = self._tickers[interval] = (self.call_every(interval, tick), callbacks)
        entry[1].append(callback)

    def remove_ticker(self, interval: float, callback: Callable[[], None]) -> None:
        entry = self._tickers.get(interval)
        if entry is not None and callback in entry[1]:
            entry[1].remove(callback)

    def _add_timer(self, timer: Timer) -> Timer:
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    # -- cross-thread --
    def in_loop(self) -> bool:
        return self._owner is None or self._owner == threading.get_ident()

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._calls.append(callback)
        if self._closed:
            raise RuntimeError(f"loop {self.name} is stopped")
        with contextlib.suppress(BlockingIOError):  # a full pipe means the loop is awake
            os.write(self._wake_w, b"\0")

    def call_sync(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` in the loop thread and return its result (or raise its exception)."""
        if self.in_loop():
            return fn()
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.call_soon_threadsafe(run)
        return fut.result(timeout)

    # -- running --
    def start(self) -> Loop:
        self._thread = threading.Thread(target=self.run, name=f"loop-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (closing its components' sockets in its own thread) and wait for it."""
        if self._thread is not None and self._thread.is_alive():
            self.call_soon_threadsafe(self._halt)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.log.error("loop did not stop in time", timeout=timeout)
                return
        elif self._running:
            self._halt()
            return
        elif self._thread is None and not self._closed:
            self._run_closers()  # never started: its components' sockets close here
        if not self._closed:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._epoll.close()

    def _halt(self) -> None:
        self._running = False

    def run(self) -> None:
        self._owner = threading.get_ident()
        self._running = True
        try:
            while self._running:
                try:
                    self._run_once()
                except zmq.ZMQError:
                    self.log.error("socket operation failed", exc_info=True)
                    time.sleep(0.01)
        finally:
            self._run_closers()

    def _run_closers(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                self.log.error("close failed", exc_info=True)
        self._closers.clear()

    def _timeout(self) -> float:
        if self._calls or self._touched:
            return 0
        if self._timers:
            # round up: a timeout truncated to 0 ms spins until the timer is due
            return max(0.0, math.ceil((self._timers[0][0] - time.monotonic()) * 1000) / 1000)
        return 1.0

    def _run_once(self) -> None:
        for fd, _ in self._epoll.poll(min(self._timeout(), 1.0)):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            entry = self._by_fd.get(fd)
            if entry is None:
                continue
            target, handler = entry
            if isinstance(target, zmq.Socket):
                self._touched.add(target)  # the edge says "look": ZMQ_EVENTS says what is there
            else:
                self._guard(handler)
        self._service_sockets()
        while self._calls:
            self._guard(self._calls.popleft())
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._guard(timer.callback)
            if timer.interval is not None and not timer.cancelled:
                timer.when = now + timer.interval
                self._add_timer(timer)
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            self._touched.update(self._zmq)

    def _service_sockets(self) -> None:
        """Run the handler of every touched socket; handlers drain by ZMQ_EVENTS, so a socket
        with nothing waiting costs one check. Sockets touched again by the handlers (a send, a
        drain that hit its limit) get further passes; past those they wait for the next turn."""
        for _ in range(_DRAIN_PASSES):
            if not self._touched:
                return
            touched, self._touched = self._touched, set()
            for sock in touched:
                entry = self._zmq.get(sock)
                if entry is not None and not sock.closed:
                    self._guard(entry[1])

    def _guard(self, fn: Callable[[], Any]) -> None:
        """A bug in one handler is logged; it never kills the loop."""
        try:
            fn()
        except Exception:
            LOOP_ERRORS.inc()
            self.log.error("handler failed", exc_info=True)
