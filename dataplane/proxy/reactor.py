"""The proxy's event loop: raw fds on epoll, a timer heap, call_soon, and a wake-up from other threads.

This is the data plane's hot path, so the loop does as little Python per event as it can:
one `epoll.poll`, one cached `time.monotonic()` per wake-up (`Reactor.now`), and for each
event a dict lookup and one call of `callback(events)`.

Edge- or level-triggered is the caller's choice per fd (pass `EPOLLET` in the mask). The
TCP forwarder registers its sockets edge-triggered with IN|OUT|RDHUP once and never calls
epoll_ctl again: back-pressure (stop reading a side whose peer is full, resume on the peer's
EPOLLOUT edge) costs no syscalls, where level-triggered would need two EPOLL_CTL_MOD calls
to pause and two to resume. Listeners stay level-triggered so an accept burst can be cut
short for fairness without losing the readiness.

Timers live in a heap: O(log n) to add, O(1) to cancel (the entry is only marked), and the
heap is rebuilt without cancelled entries once they outnumber the live ones, so a workload
that cancels almost every timer (connect timeouts) keeps the heap small.

Callbacks must not block. An exception in one is logged and the loop carries on: with
edge-triggered fds, dropping the rest of a batch would lose readiness for good.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bus.logs import Log

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR
EPOLLET = select.EPOLLET

_MAX_EVENTS = 256   # Python allocates the event array on every poll; 1023 (its default) is wasteful
_COMPACT_MIN = 256  # rebuild the timer heap only past this many cancelled entries

_log = Log("reactor")


class Timer:
    """A scheduled callback; `cancel()` is O(1) and idempotent."""

    __slots__ = ("_reactor", "callback", "when")

    def __init__(self, reactor: Reactor, when: float, callback: Callable[[], Any]) -> None:
        self._reactor = reactor
        self.when = when
        self.callback: Callable[[], Any] | None = callback

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._reactor._cancelled += 1


class Reactor:
    """One epoll loop for one thread (a proxy worker process runs exactly one)."""

    def __init__(self, scratch_size: int = 256 * 1024) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[int], Any]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._ready: deque[Callable[[], Any]] = deque()
        self._stopping = False
        self._wake_pending = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.register(self._wake_fd, EPOLLIN, self._on_wake)
        self.now = time.monotonic()
        # one copy buffer for every callback of this loop; never hold data in it across a return
        self.scratch = bytearray(scratch_size)
        self.scratch_view = memoryview(self.scratch)

    # fds -----------------------------------------------------------------------------------
    def register(self, fd: int, events: int, callback: Callable[[int], Any]) -> None:
        """Watch `fd` for `events` (add EPOLLET for edge-triggered); `callback(mask)` runs on each."""
        self._ep.register(fd, events)
        self._handlers[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def set_callback(self, fd: int, callback: Callable[[int], Any]) -> None:
        """Point a registered fd at another callback without a syscall."""
        self._handlers[fd] = callback

    def unregister(self, fd: int) -> None:
        """Stop watching `fd` (before closing it). Events already fetched for it are dropped."""
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    # scheduling ----------------------------------------------------------------------------
    def call_at(self, when: float, callback: Callable[[], Any]) -> Timer:
        """Run `callback` once at monotonic time `when` (from this loop's thread only)."""
        timer = Timer(self, when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def call_soon(self, callback: Callable[[], Any]) -> None:
        """Run `callback` after the current batch of events (from this loop's thread only)."""
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        """Hand `callback` to the loop from any thread (the bus config subscriber does)."""
        self._ready.append(callback)
        if not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def _on_wake(self, _events: int) -> None:
        self._wake_pending = False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    # running -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Make `run` return after the current iteration (thread-safe; before `run`, it returns at once)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def run(self, duration: float | None = None) -> None:
        """Dispatch events, timers and calls until `stop()` or `duration` seconds have passed."""
        deadline = None if duration is None else time.monotonic() + duration
        poll = self._ep.poll
        handlers = self._handlers
        timers = self._timers
        ready = self._ready
        monotonic = time.monotonic
        while not self._stopping:
            if ready:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            else:
                timeout = -1.0
            if deadline is not None:
                left = max(0.0, deadline - monotonic())
                timeout = left if timeout < 0 else min(timeout, left)
            events = poll(timeout, _MAX_EVENTS)
            self.now = now = monotonic()
            for fd, mask in events:
                callback = handlers.get(fd)
                if callback is not None:
                    try:
                        callback(mask)
                    except Exception:
                        _log.error("fd callback failed", exc_info=True, fd=fd)
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                callback = timer.callback
                if callback is None:
                    self._cancelled -= 1
                    continue
                timer.callback = None
                try:
                    callback()
                except Exception:
                    _log.error("timer callback failed", exc_info=True)
            if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(timers):
                self._compact()
            for _ in range(len(ready)):
                try:
                    ready.popleft()()
                except Exception:
                    _log.error("call_soon callback failed", exc_info=True)
            if deadline is not None and now >= deadline:
                break
        self._stopping = False

    def _compact(self) -> None:
        self._timers[:] = [entry for entry in self._timers if entry[2].callback is not None]
        heapq.heapify(self._timers)
        self._cancelled = 0

    def pending_timers(self) -> int:
        """Live (not cancelled) timers, for tests and debugging."""
        return len(self._timers) - self._cancelled

    def close(self) -> None:
        """Release the epoll and wake-up fds; the caller closes the fds it registered."""
        self._handlers.clear()
        self._ep.close()
        os.close(self._wake_fd)
