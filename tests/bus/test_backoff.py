"""The one retry-delay policy (pilot-agent restarts, node-agent renewals), without clocks or sockets."""

from __future__ import annotations

import random

import pytest

from bus.backoff import Backoff


def test_delays_double_up_to_the_cap() -> None:
    b = Backoff(initial=1.0, factor=2.0, cap=10.0)
    assert [b.next() for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]


def test_a_success_starts_the_delays_over() -> None:
    b = Backoff(initial=1.0, cap=8.0)
    assert [b.next() for _ in range(3)] == [1, 2, 4]
    b.reset()
    assert b.next() == 1


def test_a_long_enough_run_starts_the_delays_over() -> None:
    b = Backoff(initial=0.5, factor=2.0, cap=30.0, reset_after=20.0)
    assert [b.next_after(1.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert b.next_after(uptime=19.9) == 4.0  # not quite long enough
    assert b.next_after(uptime=20.0) == 0.5
    assert b.next_after(uptime=0.1) == 1.0


def test_a_capped_policy_never_overflows() -> None:
    b = Backoff(initial=1.0, factor=1e10, cap=5.0, jitter=0.5, rng=random.Random(0))
    assert 0.5 <= b.next() <= 1.5
    assert all(2.5 <= b.next() <= 7.5 for _ in range(2000))
    assert b.failures == 1  # the exponent stopped growing at the cap


class Scripted(random.Random):
    """A random source that returns the extremes we ask for, in turn (uniform picks a or b)."""

    def __init__(self, picks: list[float]) -> None:
        super().__init__(0)
        self.picks = picks

    def uniform(self, a: float, b: float) -> float:
        return a if self.picks.pop(0) < 0.5 else b


def test_jitter_scales_each_delay_within_its_band() -> None:
    b = Backoff(initial=1.0, cap=8.0, jitter=0.2, rng=Scripted([0, 1, 0, 1, 1]))
    assert [round(b.next(), 9) for _ in range(5)] == [0.8, 2.4, 3.2, 9.6, 9.6]


def test_jitter_spreads_delays_over_the_whole_band() -> None:
    b = Backoff(initial=1.0, cap=8.0, jitter=0.2, rng=random.Random(1))
    delays = [b.next() for _ in range(200)]
    assert all(8 * 0.8 <= d <= 8 * 1.2 for d in delays[3:])
    assert len({round(d, 6) for d in delays[3:]}) > 100  # not in lockstep


@pytest.mark.parametrize("kw", [{"initial": 0.0}, {"factor": 0.5}, {"initial": 5.0, "cap": 1.0},
                                {"jitter": 1.0}, {"jitter": -0.1}])
def test_nonsense_is_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)
