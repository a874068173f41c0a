"""Debouncing for galley's publishes and pilot's pushes, as Istio's PILOT_DEBOUNCE_AFTER /
PILOT_DEBOUNCE_MAX: wait for `quiet` seconds without a change, but never longer than
`max_delay` after the first one. `Debouncer` is sans-IO; `DebouncedCall` arms a Loop timer."""

from __future__ import annotations

import time
from collections.abc import Callable

from bus.loop import Loop, Timer


class Debouncer:
    def __init__(self, quiet: float = 0.1, max_delay: float = 10.0) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self._first: float | None = None
        self._last = 0.0
        self.merged = 0  # changes folded into the pending push

    def change(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now
        self.merged += 1

    @property
    def started(self) -> float | None:
        """When the pending burst's first change came (None: nothing pending)."""
        return self._first

    @property
    def pending(self) -> bool:
        return self._first is not None

    def deadline(self) -> float | None:
        """When the pending push is due (None: nothing pending)."""
        if self._first is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def fire(self) -> int:
        """Start the push; returns how many changes it covers."""
        merged, self.merged, self._first = self.merged, 0, None
        return merged


class DebouncedCall:
    """Calls `fn` in the loop when `debouncer` says the pending burst is due; `fn` calls
    `debouncer.fire()` itself (it may also decide it is not ready and leave the burst pending)."""

    def __init__(self, loop: Loop, debouncer: Debouncer, fn: Callable[[], None]) -> None:
        self.loop = loop
        self.debouncer = debouncer
        self._fn = fn
        self._timer: Timer | None = None

    def change(self) -> None:
        now = time.monotonic()
        self.debouncer.change(now)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(max(0.0, self.debouncer.deadline() - now), self._due)

    def _due(self) -> None:
        self._timer = None
        self._fn()
