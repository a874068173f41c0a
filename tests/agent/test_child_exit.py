"""How the agent names a child's death in its log, without processes."""

from __future__ import annotations

import signal

from dataplane.agent.child import describe_exit


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-99) == "signal 99"
