"""Push debouncing, as Istio's PILOT_DEBOUNCE_AFTER / PILOT_DEBOUNCE_MAX: wait for `quiet`
seconds without a change, but never longer than `max_delay` after the first one. Sans-IO."""

from __future__ import annotations


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
