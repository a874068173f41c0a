"""Random garbage thrown at every socket type: counted, dropped, and nothing else breaks."""

from __future__ import annotations

import random
import socket

import zmq

from bus import envelope as E
from bus.keys import Keyring
from bus.reports import ReportSender
from bus.rpc import RpcClient
from tests.bus.helpers import publisher, raw_client, raw_server, services, subscriber
from tests.conftest import metric, wait_for

RNG = random.Random(20261125)


def garbage_messages(n: int = 60) -> list[list[bytes]]:
    """Random frame counts and bytes, plus near-misses of valid envelopes."""
    good = E.make("cfg/x", E.UPDATE, {"a": 1}, seq=1).frames()
    out = []
    for i in range(n):
        if i % 3 == 0:
            frames = [bytearray(f) for f in good]
            f = frames[RNG.randrange(1, 3)]
            if f:
                f[RNG.randrange(len(f))] ^= 0xFF
            out.append([bytes(f) for f in frames])
        else:
            out.append([RNG.randbytes(RNG.randrange(1, 64)) for _ in range(RNG.choice([1, 2, 3, 4, 5]))])
    return out


def rejected() -> float:
    from prometheus_client import REGISTRY
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "zmesh_bus_messages_rejected":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def test_garbage_to_every_socket_type_is_counted_and_service_continues(keydir, loops) -> None:
    svc = services(loops("svc"), keydir)
    pub, rpc, col, reports = svc.pub, svc.rpc, svc.collector, svc.reports
    # a garbage publisher feeding a real subscriber
    bad_pub, bad_port = raw_server(zmq.PUB, keydir, "pilot")
    victim = subscriber(loops("victim"), keydir, None, pub_endpoint=f"tcp://127.0.0.1:{bad_port}",
                        snapshot_endpoint=pub.snapshot_endpoint)
    attackers = {
        "snapshot": raw_client(zmq.DEALER, keydir, "nodeagent", pub.snapshot_endpoint),
        "rpc": raw_client(zmq.DEALER, keydir, "nodeagent", rpc.endpoint),
        "reports": raw_client(zmq.PUSH, keydir, "nodeagent", col.endpoint),
        "xpub": raw_client(zmq.XSUB, keydir, "nodeagent", pub.pub_endpoint),
    }
    before = rejected()
    try:
        wait_for(lambda: False, timeout=0.3)  # let the CURVE handshakes finish
        sent = 0
        for frames in garbage_messages():
            for sock in attackers.values():
                sock.send_multipart(frames)
                sent += 1
            bad_pub.send_multipart(frames)
        # every socket type dropped and counted what it got (XSUB garbage that happens to start
        # with 0/1 is a (harmless) subscription, so not everything counts as rejected)
        assert wait_for(lambda: rejected() - before >= sent * 0.6, timeout=10), rejected() - before

        # and every service still works
        pub.set("cfg/b", 2)
        sub = subscriber(loops("sub"), keydir, pub)
        assert sub.wait_ready(5) and wait_for(lambda: sub.get("cfg/b") == 2)
        client = RpcClient(rpc.endpoint, Keyring(keydir, "nodeagent"), "pilot")
        assert client.call("ping") == "pong"
        client.close()
        sender = ReportSender(col.endpoint, Keyring(keydir, "proxy-a"), "pilot")
        sender.send("t", "ok")
        assert wait_for(lambda: "ok" in reports)
        sender.close()
        assert victim.items() == {}
    finally:
        bad_pub.close(0)
        for sock in attackers.values():
            sock.close(0)


def test_raw_tcp_garbage_never_reaches_the_application(keydir, loops) -> None:
    """Bytes that are not even ZMTP: libzmq drops the connection; the bus keeps serving."""
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/a", 1)
    for endpoint in (pub.pub_endpoint, pub.snapshot_endpoint):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        junk = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", RNG.randbytes(4096), b"\xff" + b"\x00" * 8 + b"\x7f")
        for payload in junk:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(payload)
    sub = subscriber(loops("sub"), keydir, pub)
    assert sub.wait_ready(5) and sub.get("cfg/a") == 1


def test_an_oversized_body_is_rejected_by_the_subscriber(keydir, loops) -> None:
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/small", 1)
    sub = subscriber(loops("sub"), keydir, pub, max_body=1024)
    assert sub.wait_ready(5)
    before = metric("zmesh_bus_messages_rejected_total", reason="body_too_large")
    pub.set("cfg/big", "x" * 4096)
    pub.set("cfg/small", 2)
    assert wait_for(lambda: sub.get("cfg/small") == 2, timeout=5)
    assert wait_for(lambda: metric("zmesh_bus_messages_rejected_total", reason="body_too_large") > before)
    assert sub.get("cfg/big") is None


def test_a_value_over_the_bus_limit_is_refused_by_its_publisher(keydir, loops) -> None:
    """No subscriber's socket would take it, so it never goes out: the rest still does."""
    pub = publisher(loops("pub"), keydir)
    sub = subscriber(loops("sub"), keydir, pub)
    assert sub.wait_ready(5)
    before = metric("zmesh_bus_messages_rejected_total", reason="body_too_large")
    pub.set("cfg/huge", b"x" * (E.DEFAULT_MAX_BODY + 1))
    pub.set("cfg/after", 1)
    assert wait_for(lambda: sub.get("cfg/after") == 1)
    assert metric("zmesh_bus_messages_rejected_total", reason="body_too_large") == before + 1
    assert sub.get("cfg/huge") is None and sub.resyncs == 0
