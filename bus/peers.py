"""Which connections of one socket completed their ZeroMQ handshake, from its monitor events (sans-IO).

libzmq names a connection (by fd) only when it opens (ACCEPTED / CONNECTED) and ends (DISCONNECTED /
CLOSED); a handshake's success or failure names none. So the ledger ties them together itself:

- a failure event belongs to the next unhandshaken connection that ends (libzmq reports the
  failure and the disconnect in one call);
- a connection that ends with no failure event and no success since it opened never handshook
  (libzmq drops bytes that are not a ZMTP greeting without any handshake event);
- success number k can only belong to a connection opened before it. When exactly j connections
  could own the first j unattributed successes, they are all handshaken.

When a connection ends and the ledger cannot tell (another pending connection could own the
success), it counts it as never handshaken: garbage can then never drive the peer count down, and
a handshaken peer's departure counted that way is found once the ledger runs out of candidates
for its success (`peers` drops then).
"""

from __future__ import annotations

import bisect
import enum


class Ending(enum.Enum):
    PEER_LEFT = "peer_left"        # a handshaken peer's connection ended
    FAILED = "failed"              # its handshake failure was reported (and counted) already
    BAD_GREETING = "bad_greeting"  # ended unhandshaken with no event: not a ZMTP peer
    UNKNOWN = "unknown"            # not a connection this ledger saw open (a connect attempt)


class PeerLedger:
    def __init__(self) -> None:
        self._pending: dict[int, int] = {}  # fd -> successes seen before it opened
        self._handshaken: set[int] = set()
        self._unattributed: list[int] = []  # numbers of successes not yet tied to an fd, ascending
        self._successes = 0
        self._failures = 0                  # failure events whose connection has not ended yet

    @property
    def peers(self) -> int:
        """Connections that completed a handshake and are still open."""
        return len(self._handshaken) + len(self._unattributed)

    @property
    def pending(self) -> int:
        """Connections still in (or stuck before) their handshake."""
        return len(self._pending) - len(self._unattributed)

    def opened(self, fd: int) -> None:
        self._handshaken.discard(fd)  # an fd reused: its old connection's end went unseen
        self._pending[fd] = self._successes

    def succeeded(self) -> None:
        self._successes += 1
        self._unattributed.append(self._successes)
        self._settle()

    def failed(self) -> None:
        self._failures += 1

    def ended(self, fd: int) -> Ending:
        if fd in self._handshaken:
            self._handshaken.remove(fd)
            if self._failures:  # a guess went wrong: its failure was just reported
                self._failures -= 1
                return Ending.FAILED
            return Ending.PEER_LEFT
        if fd not in self._pending:
            self._failures = max(0, self._failures - 1)
            return Ending.UNKNOWN
        opened_at = self._pending.pop(fd)
        if self._failures:
            self._failures -= 1
            ending = Ending.FAILED
        else:
            later = [k for k in self._unattributed if k > opened_at]
            if later and not self._feasible():  # no one else could own those successes: it did
                self._unattributed.remove(later[0])
                ending = Ending.PEER_LEFT
            else:
                ending = Ending.BAD_GREETING
        self._settle()
        return ending

    def _owners(self) -> list[int]:
        """How many pending connections could own each unattributed success, in order."""
        opened = sorted(self._pending.values())
        return [bisect.bisect_left(opened, k) for k in self._unattributed]

    def _feasible(self) -> bool:
        return all(n >= j for j, n in enumerate(self._owners(), 1))

    def _settle(self) -> None:
        """Drop successes no open connection can own (their peers left unseen), then mark the
        connections that must own the first j successes as handshaken."""
        while self._unattributed:
            owners = self._owners()
            short = next((j for j, n in enumerate(owners, 1) if n < j), None)
            if short is not None:
                del self._unattributed[short - 1]
                continue
            forced = next((j for j, n in enumerate(owners, 1) if n == j), None)
            if forced is None:
                return
            bound = self._unattributed[forced - 1]
            for fd in [fd for fd, opened_at in self._pending.items() if opened_at < bound]:
                del self._pending[fd]
                self._handshaken.add(fd)
            del self._unattributed[:forced]
