"""Pilot's push debouncing and ACK/NACK bookkeeping, without sockets."""

from __future__ import annotations

from controlplane.debounce import Debouncer
from controlplane.pilot.xds.status import NACKED, NOT_SENT, SENT, STALE, SYNCED, StatusTracker


def test_a_hundred_changes_in_fifty_ms_are_one_push() -> None:
    d = Debouncer(quiet=0.1, max_delay=10)
    pushes = 0
    now = 0.0
    for _ in range(100):
        d.change(now)
        assert not d.due(now)
        now += 0.0005
    while now < 1.0:
        if d.due(now):
            assert d.fire() == 100
            pushes += 1
        now += 0.001
    assert pushes == 1 and not d.pending


def test_quiet_is_measured_from_the_last_change_but_capped_by_max_delay() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0)
    d.change(0.0)
    assert d.deadline() == 0.1
    d.change(0.05)
    assert abs(d.deadline() - 0.15) < 1e-9
    t = 0.05
    while t < 0.95:  # a change every 50 ms never lets it go quiet...
        t += 0.05
        d.change(t)
    assert d.due(1.0)  # ...but max_delay forces the push
    assert not d.due(0.99)


def test_proxy_states() -> None:
    st = StatusTracker(stale_after=5)
    st.known("p1", 0)
    assert st.state("p1", 0) == NOT_SENT
    st.sent("p1", "v1", 1)
    assert st.state("p1", 2) == SENT and st.state("p1", 7) == STALE
    st.ack("p1", "v1", 7.5)
    assert st.state("p1", 8) == SYNCED
    st.sent("p1", "v2", 9)
    st.nack("p1", "v2", "route x: bad regex", "v1", 9.1)
    assert st.state("p1", 10) == NACKED
    [row] = st.rows(10)
    assert row["error"] == "route x: bad regex" and row["in_force"] == "v1" and row["acked"] == "v1"
    assert row["since_contact_s"] == 0.9
    st.sent("p1", "v3", 11)
    st.ack("p1", "v3", 11.2)
    assert st.state("p1", 12) == SYNCED and st.rows(12)[0]["error"] == ""
    st.sent("p1", "v3", 50)  # re-sending the same version keeps the proxy SYNCED
    assert st.state("p1", 60) == SYNCED
