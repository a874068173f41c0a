"""PeerLedger, sans-IO: monitor event sequences as libzmq 4.3 emits them (recorded in exp runs:
garbage is ACCEPTED then DISCONNECTED with no handshake event)."""

from __future__ import annotations

import itertools
import random

from bus.peers import Ending, PeerLedger


def handshaken(ledger: PeerLedger, fd: int) -> None:
    ledger.opened(fd)
    ledger.succeeded()


def test_garbage_and_refused_handshakes_never_move_the_count() -> None:
    ledger = PeerLedger()
    handshaken(ledger, 10)
    for fd in range(20, 60):  # bytes that are not a greeting: no handshake event at all
        ledger.opened(fd)
        assert ledger.ended(fd) is Ending.BAD_GREETING
        assert ledger.peers == 1
    for fd in range(60, 100):  # a NULL greeting to a CURVE socket, a refused key
        ledger.opened(fd)
        ledger.failed()
        assert ledger.ended(fd) is Ending.FAILED
        assert ledger.peers == 1
    assert ledger.ended(10) is Ending.PEER_LEFT
    assert ledger.peers == 0
    assert ledger.ended(10) is Ending.UNKNOWN  # a second event for it (CLOSED) changes nothing
    assert ledger.peers == 0


def test_a_success_is_tied_to_the_only_connection_that_can_own_it() -> None:
    ledger = PeerLedger()
    ledger.opened(1)
    ledger.opened(2)
    ledger.succeeded()  # 1 or 2
    assert ledger.peers == 1 and ledger.pending == 1
    ledger.opened(3)  # opened after the success: cannot own it
    assert ledger.ended(3) is Ending.BAD_GREETING
    ledger.failed()
    assert ledger.ended(2) is Ending.FAILED  # so 1 handshook
    assert ledger.peers == 1 and ledger.pending == 0
    assert ledger.ended(1) is Ending.PEER_LEFT
    assert ledger.peers == 0


def test_the_last_candidate_to_end_must_have_been_the_peer() -> None:
    ledger = PeerLedger()
    ledger.opened(1)
    ledger.opened(2)
    ledger.succeeded()
    ledger.succeeded()  # both handshook
    assert ledger.peers == 2 and ledger.pending == 0
    assert ledger.ended(2) is Ending.PEER_LEFT and ledger.peers == 1


def test_an_ambiguous_end_never_lowers_the_count_and_is_corrected_later() -> None:
    """An idle connection (no bytes yet) and a peer that handshook: when one ends silently the
    ledger cannot tell which. It keeps the count (garbage must not lower it); the truth shows
    when the idle one times out with a failure."""
    ledger = PeerLedger()
    ledger.opened(1)  # idle
    ledger.opened(2)
    ledger.succeeded()  # 2's
    assert ledger.ended(2) is Ending.BAD_GREETING  # a guess: it may have been garbage
    assert ledger.peers == 1  # (1 now inherits the success)
    ledger.failed()  # 1's handshake timer
    assert ledger.ended(1) is Ending.FAILED
    assert ledger.peers == 0


def test_reused_fds_and_unknown_ends() -> None:
    ledger = PeerLedger()
    handshaken(ledger, 7)
    ledger.opened(7)  # its end was never seen: the new connection replaces it
    assert ledger.peers == 0 and ledger.pending == 1
    assert ledger.ended(99) is Ending.UNKNOWN  # a connect attempt's CLOSED
    ledger.succeeded()
    assert ledger.peers == 1


def test_random_interleavings_never_undercount_and_settle_exactly() -> None:
    """Connections come and go in random order, as libzmq's one I/O thread reports them: legit
    ones handshake and later leave, garbage ends with no event, refused ones with a failure
    event just before their end. The count never drops below the truth, and is exact whenever
    no connection is mid-handshake."""
    rng = random.Random(12)
    ledger = PeerLedger()
    fresh, legit, bad = itertools.count(), [], []  # legit: [fd, handshook]
    connected = 0
    for _ in range(5000):
        step = rng.random()
        if step < 0.3:
            fd = next(fresh)
            ledger.opened(fd)
            (legit if rng.random() < 0.5 else bad).append([fd, False])
        elif step < 0.5 and any(not h for _, h in legit):
            conn = rng.choice([c for c in legit if not c[1]])
            conn[1] = True
            ledger.succeeded()
            connected += 1
        elif step < 0.75 and bad:
            fd, _ = bad.pop(rng.randrange(len(bad)))
            before = ledger.peers
            if rng.random() < 0.5:
                ledger.failed()
            ledger.ended(fd)
            # it only ever corrects an overcount (a peer that left while the ledger could not tell)
            assert ledger.peers == before or connected <= ledger.peers < before
        elif any(h for _, h in legit):
            conn = rng.choice([c for c in legit if c[1]])
            legit.remove(conn)
            ledger.ended(conn[0])
            connected -= 1
        assert ledger.peers >= connected
        if not bad and all(h for _, h in legit):
            assert ledger.peers == connected
    for fd, _ in bad:
        ledger.ended(fd)
    for fd, _ in legit:
        ledger.ended(fd)
    assert ledger.peers == 0 and ledger.pending == 0
