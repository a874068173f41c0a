"""A small reactor over zmq.Poller: socket readers, timers and calls from other threads.

ZeroMQ sockets are not thread-safe, so every bus component lives on one Loop and
other threads reach it only through `call_soon_threadsafe` / `call_sync`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from bus.context import context
from bus.logs import Log


class Timer:
    __slots__ = ("callback", "cancelled", "interval", "when")

    def __init__(self, when: float, callback: Callable[[], Any], interval: float | None) -> None:
        self.when = when
        self.callback = callback
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self, name: str = "bus", ctx: zmq.Context | None = None) -> None:
        self.name = name
        self.ctx = ctx or context()
        self.log = Log("bus.loop", loop=name)
        self._poller = zmq.Poller()
        self._readers: dict[Any, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._thread: threading.Thread | None = None
        self._owner: int | None = None
        self._running = False
        self._closed = False
        self._closers: list[Callable[[], None]] = []

    # -- registration --
    def add_reader(self, sock: zmq.Socket | int, callback: Callable[[], None]) -> None:
        self._readers[sock] = callback
        self._poller.register(sock, zmq.POLLIN)

    def remove_reader(self, sock: zmq.Socket | int) -> None:
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` in the loop thread when the loop stops (sockets close there)."""
        self._closers.append(closer)

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self._add_timer(Timer(time.monotonic() + delay, callback, None))

    def call_every(self, interval: float, callback: Callable[[], Any]) -> Timer:
        return self._add_timer(Timer(time.monotonic() + interval, callback, interval))

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
        if not self._closed:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

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
                    self.log.error("poll failed", exc_info=True)
                    time.sleep(0.01)
        finally:
            for closer in reversed(self._closers):
                try:
                    closer()
                except Exception:
                    self.log.error("close failed", exc_info=True)
            self._closers.clear()


    def _run_once(self) -> None:
        timeout = 1000.0
        if self._calls:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, (self._timers[0][0] - time.monotonic()) * 1000)
        for sock, _ in self._poller.poll(min(timeout, 1000.0)):
            if sock == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            handler = self._readers.get(sock)
            if handler is not None:
                self._guard(handler)
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

    def _guard(self, fn: Callable[[], Any]) -> None:
        """A bug in one handler is logged; it never kills the loop."""
        try:
            fn()
        except Exception:
            self.log.error("handler failed", exc_info=True)
