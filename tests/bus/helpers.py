"""Builders for bus components in tests (real sockets on loopback)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bus.context import context
from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher, Subscriber
from bus.reports import ReportCollector
from bus.rpc import RpcServer
from bus.signing import Signer, Verifier
from tests.conftest import free_port

FAST = {"hb_interval": 0.2}
FAST_SUB = {"silence_timeout": 1.0, "snapshot_timeout": 0.5}


def publisher(loop: Loop, keydir: Path, name: str = "pilot", **kw: Any) -> Publisher:
    ring = Keyring(keydir, name)
    opts = {"pub_endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*", **FAST, **kw}
    return loop.call_sync(lambda: Publisher(loop, keyring=ring, signer=Signer(name, ring.signing_key()),
                                            name=name, **opts))


def subscriber(loop: Loop, keydir: Path, pub: Publisher | None, prefix: str = "cfg/",
               name: str = "proxy-a", server: str = "pilot", changes: list | None = None,
               **kw: Any) -> Subscriber:
    ring = Keyring(keydir, name)
    opts = {**FAST_SUB, **kw}
    if pub is not None:
        opts.setdefault("pub_endpoint", pub.pub_endpoint)
        opts.setdefault("snapshot_endpoint", pub.snapshot_endpoint)
    if changes is not None:
        opts["on_change"] = lambda k, v: changes.append((k, v))
    return loop.call_sync(lambda: Subscriber(loop, prefix=prefix, keyring=ring, server=server,
                                             verifier=Verifier(ring.trusted_signers), name=name, **opts))


@dataclass
class Services:
    """One of each listening socket on one loop: a publisher holding cfg/a=1, an RPC server that
    answers `ping`, and a report collector keeping what it gets in `reports`."""

    pub: Publisher
    rpc: RpcServer
    collector: ReportCollector
    reports: list = field(default_factory=list)


def services(loop: Loop, keydir: Path, name: str = "pilot") -> Services:
    pub = publisher(loop, keydir, name=name)
    pub.set("cfg/a", 1)
    ring = Keyring(keydir, name)
    reports: list = []
    rpc = loop.call_sync(lambda: RpcServer(loop, "tcp://127.0.0.1:*", ring, {"ping": lambda r: "pong"}))
    col = loop.call_sync(lambda: ReportCollector(loop, "tcp://127.0.0.1:*", ring,
                                                 lambda t, v, o: reports.append(v)))
    return Services(pub, rpc, col, reports)


def raw_server(kind: int, keydir: Path, name: str) -> tuple[zmq.Socket, int]:
    """A bare CURVE server socket with `name`'s keys (no ZAP), bound to a random port."""
    keys = Keyring(keydir, name).curve()
    sock = context().socket(kind)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    return sock, sock.bind_to_random_port("tcp://127.0.0.1")


def raw_client(kind: int, keydir: Path, name: str, endpoint: str, server: str = "pilot") -> zmq.Socket:
    """A bare CURVE client socket with `name`'s keys, connected to `endpoint`."""
    ring = Keyring(keydir, name)
    keys = ring.curve()
    sock = context().socket(kind)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    sock.curve_serverkey = ring.curve_public(server)
    sock.connect(endpoint)
    return sock


def fixed_endpoints() -> dict[str, str]:
    """Publisher endpoints for a publisher that a test restarts on the same ports (see free_port)."""
    return {"pub_endpoint": f"tcp://127.0.0.1:{free_port()}", "snapshot_endpoint": f"tcp://127.0.0.1:{free_port()}"}
