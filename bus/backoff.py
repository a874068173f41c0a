"""One retry-delay policy for every component (sans-IO: no clocks, no sleeps).

Exponential from `initial` by `factor`, capped at `cap`, optionally jittered by a factor in
[1-jitter, 1+jitter] so that many peers restarted together do not retry in lockstep. It lives in
`bus/` because both the data plane (pilot-agent restarting the proxy) and the node agent
(certificate renewal) use it, and neither may import the other.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for consecutive failures; `reset` (a success) starts them over.

    `next_after(uptime)` is for a process supervisor: a run that lasted `reset_after` seconds
    counts as a success first, so a proxy that crashes on start is not restarted in a hot loop,
    but one that ran for an hour and then died once is restarted promptly.
    """

    def __init__(self, initial: float = 1.0, factor: float = 2.0, cap: float = 30.0, *,
                 jitter: float = 0.0, reset_after: float = 60.0,
                 rng: random.Random | None = None) -> None:
        if not (0 < initial <= cap and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < initial <= cap, factor >= 1 and 0 <= jitter < 1")
        self.initial, self.factor, self.cap = initial, factor, cap
        self.jitter, self.reset_after = jitter, reset_after
        self._rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = min(self.cap, self.initial * self.factor ** self.failures)
        if delay < self.cap:  # once capped, stop growing the exponent (no float overflow)
            self.failures += 1
        if self.jitter:
            delay *= self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        return delay

    def next_after(self, uptime: float) -> float:
        """The delay before restarting a process that ran `uptime` seconds and died."""
        if uptime >= self.reset_after:
            self.reset()
        return self.next()

    def reset(self) -> None:
        self.failures = 0
