"""When to restart the proxy, and how to say why it died (sans-IO: no clocks, no processes)."""

from __future__ import annotations

import signal


class Backoff:
    """Exponential restart delays, capped, and forgotten once the proxy has stayed up `reset_after`.

    A proxy that crashes on start must not be restarted in a hot loop, but one that ran for an
    hour and then died once deserves a prompt restart.
    """

    def __init__(self, initial: float = 1.0, factor: float = 2.0, cap: float = 30.0,
                 reset_after: float = 60.0) -> None:
        if initial <= 0 or factor < 1 or cap < initial:
            raise ValueError("need initial > 0, factor >= 1 and cap >= initial")
        self.initial, self.factor, self.cap, self.reset_after = initial, factor, cap, reset_after
        self.failures = 0

    def next_delay(self, uptime: float) -> float:
        """The delay before the next start, given how long (seconds) the proxy that died was up."""
        if uptime >= self.reset_after:
            self.failures = 0
        delay = min(self.cap, self.initial * self.factor ** self.failures)
        if delay < self.cap:  # once capped, stop growing the exponent (no float overflow)
            self.failures += 1
        return delay


def describe_exit(returncode: int) -> str:
    """Popen's returncode as a reason for the log: 'exit code 3' or 'signal SIGKILL'."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"
