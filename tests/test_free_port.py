"""free_port's ports lie below the ephemeral range, and wait_released makes a same-port restart safe."""

from __future__ import annotations

import pytest
import zmq

from bus.context import context
from tests.conftest import EPHEMERAL_RANGE, free_port, wait_released


def test_ports_are_below_the_ephemeral_range_distinct_and_unbound() -> None:
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # handed out, not yet bound: never handed out twice
    assert all(1024 <= p < low for p in ports), (low, ports)


def test_a_zmq_listener_rebinds_its_port_after_wait_released() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for _ in range(30):  # without the wait, bind() after close() failed 77 times in 300 here
        sock = context().socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(endpoint)
        sock.close(0)
        wait_released(endpoint)
    held = context().socket(zmq.ROUTER)
    held.bind(endpoint)
    try:
        with pytest.raises(AssertionError, match="still bound"):
            wait_released(endpoint, timeout=0.2)
    finally:
        held.close(0)
