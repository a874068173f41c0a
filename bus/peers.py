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
import itertools


class Ending(enum.Enum):
    PEER_LEFT = "peer_left"        # a handshaken peer's connection ended
    FAILED = "failed"              # its handshake failure was reported (and counted) already
    BAD_GREETING = "bad_greeting"  # ended unhandshaken with no event: not a ZMTP peer
    UNKNOWN = "unknown"            # not a connection this ledger saw open (a connect attempt)


class PeerLedger:
    """O(1) per event, except a pending connection's end (O(unattributed successes)).

    Connections open in order of the success count at their opening (`_pending` keeps that order),
    so the connections that could own unattributed success j are a prefix of `_pending`, of
    length n_j. `_slack[j]` is n_j - (j + 1): how many of those could still be garbage. A slack of
    0 means that prefix all handshook; below 0, a peer among them left unseen.
    """

    def __init__(self) -> None:
        self._pending: dict[int, int] = {}  # fd -> successes seen before it opened, in that order
        self._handshaken: set[int] = set()
        self._unattributed: list[int] = []  # numbers of successes not yet tied to an fd, ascending
        self._slack: list[int] = []
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
        if fd in self._pending:
            self.ended(fd)
        self._pending[fd] = self._successes  # after every success so far: it owns none of them

    def succeeded(self) -> None:
        self._successes += 1
        self._unattributed.append(self._successes)
        self._slack.append(len(self._pending) - len(self._unattributed))  # every pending one may own it
        if self._slack[-1] <= 0:  # (every other slack is above 0 between calls)
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
        first = bisect.bisect_right(self._unattributed, opened_at)  # the successes it could own
        if self._failures:
            self._failures -= 1
            ending = Ending.FAILED
        elif first < len(self._slack) and min(self._slack[first:]) == 0:
            # without it, too few connections would be left to own those successes: it owned one
            del self._unattributed[first], self._slack[first]
            return Ending.PEER_LEFT
        else:
            ending = Ending.BAD_GREETING
        for j in range(first, len(self._slack)):
            self._slack[j] -= 1
        self._settle()
        return ending

    def _settle(self) -> None:
        """Drop successes no open connection can own (their peers left unseen), then mark the
        prefix of connections that must own the first j successes as handshaken."""
        while self._slack:
            low = min(self._slack)
            if low > 0:
                return
            j = self._slack.index(low)
            if low < 0:
                del self._unattributed[j], self._slack[j]
                for i in range(j, len(self._slack)):
                    self._slack[i] += 1
                continue
            for fd in list(itertools.islice(self._pending, j + 1)):
                del self._pending[fd]
                self._handshaken.add(fd)
            del self._unattributed[:j + 1], self._slack[:j + 1]
