"""Connections that never complete a handshake: counted with a reason, never counted as peers.

Random bytes (libzmq drops them with no handshake event) and NULL-mechanism greetings (to CURVE
sockets: a protocol failure) are thrown at every listening socket, many times over, while one
legit peer stays connected to each. The peers gauge must stay at that one.
"""

from __future__ import annotations

import random
import socket

import pytest

from bus.keys import Keyring
from bus.reports import ReportSender
from bus.rpc import RpcClient
from tests.bus.helpers import services, subscriber
from tests.conftest import metric, wait_for

RNG = random.Random(20261208)
ATTEMPTS = 25
ROLES = ("publisher", "snapshot", "rpc-server", "reports")
# ZMTP 3.0 greeting: signature, version 3.0, mechanism NULL, as-server 0, filler
NULL_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def random_bytes() -> bytes:
    """64 random bytes that do not start a ZMTP 3 greeting (0xFF would make some a valid one)."""
    return bytes([RNG.randrange(255)]) + RNG.randbytes(63)


def throw(endpoint: str, payload: bytes) -> None:
    """Connect, send `payload` and wait until the server hangs up."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


def failures(role: str, reason: str) -> float:
    return metric("zmesh_bus_handshake_failures_total", role=role, reason=reason)


def peers(role: str) -> float:
    return metric("zmesh_bus_connected_peers", role=role)


@pytest.mark.parametrize("payload,reason", [(random_bytes, "bad_greeting"),
                                            (lambda: NULL_GREETING, "handshake_protocol")],
                         ids=["random-64-bytes", "null-greeting"])
def test_failed_handshakes_are_counted_and_never_move_the_peers_gauge(keydir, loops, payload,
                                                                      reason) -> None:
    gauges = {role: peers(role) for role in ROLES}
    svc = services(loops("galley"), keydir, name="galley")
    pub, rpc, col, reports = svc.pub, svc.rpc, svc.collector, svc.reports
    sub = subscriber(loops("proxy"), keydir, pub, server="galley")
    client = RpcClient(rpc.endpoint, Keyring(keydir, "nodeagent"), "galley")
    sender = ReportSender(col.endpoint, Keyring(keydir, "proxy-a"), "galley")
    try:
        assert sub.wait_ready(5) and client.call("ping") == "pong"
        sender.send("t", "first")
        assert wait_for(lambda: reports == ["first"])
        targets = {"publisher": pub.pub_endpoint, "snapshot": pub.snapshot_endpoint,
                   "rpc-server": rpc.endpoint, "reports": col.endpoint}
        assert wait_for(lambda: all(peers(r) == gauges[r] + 1 for r in ROLES)), \
            {r: peers(r) - gauges[r] for r in ROLES}
        before = {role: failures(role, reason) for role in ROLES}

        for _ in range(ATTEMPTS):
            for endpoint in targets.values():
                throw(endpoint, payload())

        assert wait_for(lambda: all(failures(r, reason) - before[r] == ATTEMPTS for r in ROLES)), \
            {r: failures(r, reason) - before[r] for r in ROLES}
        # the legit peers were counted all along, and still are; nothing else moved the gauge
        assert {r: peers(r) - gauges[r] for r in ROLES} == dict.fromkeys(ROLES, 1)
        assert [m.peers for m in (pub.monitor, pub.snapshot_monitor, rpc.monitor, col.monitor)] == [1] * 4
        # and they still work
        pub.set("cfg/a", 2)
        assert wait_for(lambda: sub.get("cfg/a") == 2)
        assert client.call("ping") == "pong"
        sender.send("t", "second")
        assert wait_for(lambda: reports == ["first", "second"])
        assert {r: failures(r, reason) - before[r] for r in ROLES} == dict.fromkeys(ROLES, ATTEMPTS)
    finally:
        client.close()
        sender.close()
