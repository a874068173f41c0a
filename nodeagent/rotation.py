"""When to ask citadel for a certificate, sans-IO: renewal at half the lifetime, backoff on failure.

Times are Unix seconds (certificates expire in wall-clock time); the shell passes `now`.
Jitter keeps a node's identities, and a fleet of nodes restarted together, from renewing
in lockstep against one CA.
"""

from __future__ import annotations

import random

from bus.backoff import Backoff

RETRY_JITTER = 0.2  # a failed request is retried after its backoff delay +-20%


class Rotation:
    """One identity's certificate schedule.

    `due(now)` says when to send a CSR; the shell then calls `started`, and `issued` or
    `failed` when the answer comes. At most one request is in flight. `renew_now` (a new
    trust bundle) asks for a new certificate even while a request is in flight: the answer
    to that one may already be signed by the old root, so another follows it at once.
    """

    def __init__(self, renew_at: float = 0.5, jitter: float = 0.1, backoff: Backoff | None = None,
                 rng: random.Random | None = None) -> None:
        if not (renew_at - jitter > 0 and renew_at + jitter < 1):
            raise ValueError("renewal must fall strictly inside the lifetime")
        self.renew_at, self.jitter = renew_at, jitter
        self._rng = rng or random.Random()
        self.backoff = backoff or Backoff(jitter=RETRY_JITTER, rng=self._rng)
        self.expires: float | None = None   # of the certificate in force
        self.next_at = 0.0                  # when to ask next (0: as soon as possible)
        self.in_flight = False
        self._wanted = 0                    # bumped by renew_now
        self._asked = 0                     # _wanted when the request in flight was sent

    def due(self, now: float) -> bool:
        return not self.in_flight and now >= self.next_at

    def started(self) -> None:
        self.in_flight = True
        self._asked = self._wanted

    def issued(self, now: float, expires: float) -> float:
        """A certificate valid until `expires` is in force; returns when to renew it."""
        self.in_flight = False
        self.expires = expires
        self.backoff.reset()
        fraction = self._rng.uniform(self.renew_at - self.jitter, self.renew_at + self.jitter)
        self.next_at = now if self._asked != self._wanted else now + max(0.0, expires - now) * fraction
        return self.next_at

    def failed(self, now: float) -> float:
        """The request failed; returns the delay before the next attempt."""
        self.in_flight = False
        delay = self.backoff.next()
        self.next_at = now + delay
        return delay

    def renew_now(self) -> None:
        self._wanted += 1
        self.next_at = 0.0

    def left(self, now: float) -> float | None:
        """Seconds the certificate in force has left (negative: expired); None before the first."""
        return None if self.expires is None else self.expires - now
