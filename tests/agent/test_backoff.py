"""The restart policy, without processes or clocks."""

from __future__ import annotations

import signal

import pytest

from dataplane.agent.backoff import Backoff, describe_exit


def test_delays_double_up_to_the_cap() -> None:
    b = Backoff(initial=1.0, factor=2.0, cap=10.0, reset_after=60.0)
    assert [b.next_delay(uptime=0.5) for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]


def test_a_long_enough_run_starts_the_delays_over() -> None:
    b = Backoff(initial=0.5, factor=2.0, cap=30.0, reset_after=20.0)
    assert [b.next_delay(1.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert b.next_delay(uptime=19.9) == 4.0  # not quite long enough
    assert b.next_delay(uptime=20.0) == 0.5
    assert b.next_delay(uptime=0.1) == 1.0


def test_a_capped_policy_never_overflows() -> None:
    b = Backoff(initial=1.0, factor=10.0, cap=5.0)
    assert [b.next_delay(0) for _ in range(2000)][-1] == 5.0


@pytest.mark.parametrize("args", [(0.0, 2.0, 1.0), (1.0, 0.5, 10.0), (5.0, 2.0, 1.0)])
def test_nonsense_is_refused(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(*args)


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-99) == "signal 99"
