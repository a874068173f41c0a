"""CURVE + ZAP allow-list, server-key checks, and Ed25519 signatures end to end."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import zmq

from bus import envelope as E
from bus import keys
from bus.keys import Keyring
from bus.pubsub import Publisher
from bus.signing import Signer
from tests.bus.helpers import publisher, raw_client, raw_server, subscriber
from tests.conftest import metric, wait_for


def test_an_unknown_client_key_gets_nothing(keydir, outsider_dir, loops, tmp_path) -> None:
    # the intruder knows pilot's public keys; only its own key is not on the allow-list
    ring = tmp_path / "intruder-ring"
    ring.mkdir()
    for f in ("intruder.key", "intruder.key_secret"):
        shutil.copy(outsider_dir / f, ring / f)
    for f in ("pilot.key", "pilot.sign.pub"):
        shutil.copy(keydir / f, ring / f)
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/secret", "s3cr3t")
    before = metric("zmesh_bus_auth_failures_total", side="server", reason="unknown_key")
    got: list = []
    intruder = subscriber(loops("intruder"), ring, pub, name="intruder", changes=got)
    assert not intruder.wait_ready(1.5)
    assert got == [] and intruder.items() == {}
    assert metric("zmesh_bus_auth_failures_total", side="server", reason="unknown_key") > before
    assert wait_for(lambda: intruder.last_error is not None, timeout=3)
    assert "refused" in intruder.last_error


def test_a_wrong_server_key_is_detected_and_reported(keydir, outsider_dir, loops, tmp_path) -> None:
    pub = publisher(loops("pub"), keydir)
    # a keyring where "pilot" has a different public key than the real server holds
    ring = tmp_path / "ring"
    shutil.copytree(keydir, ring)
    shutil.copy(outsider_dir / "pilot.key", ring / "pilot.key")
    before = metric("zmesh_bus_auth_failures_total", side="client", reason="handshake_failed")
    sub = subscriber(loops("sub"), ring, pub)
    assert wait_for(lambda: sub.last_error is not None, timeout=5)
    assert "wrong server public key" in sub.last_error
    assert not sub.ready
    assert metric("zmesh_bus_auth_failures_total", side="client", reason="handshake_failed") > before


def test_a_forged_publisher_is_rejected(keydir, outsider_dir, loops, tmp_path) -> None:
    """An impostor holds a valid CURVE server key but signs as 'pilot' with another key."""
    ring = tmp_path / "ring"
    shutil.copytree(keydir, ring)
    for suffix in (".sign", ".sign.pub"):  # the impostor's own view: its own signing key
        shutil.copy(outsider_dir / f"pilot{suffix}", ring / f"pilot{suffix}")
    loop = loops("impostor")
    ring_key = Keyring(ring, "pilot")
    impostor = loop.call_sync(lambda: Publisher(
        loop, pub_endpoint="tcp://127.0.0.1:*", snapshot_endpoint="tcp://127.0.0.1:*",
        keyring=ring_key, signer=Signer("pilot", ring_key.signing_key()), hb_interval=0.2))
    impostor.set("cfg/route", "to-evil")
    before = metric("zmesh_bus_messages_rejected_total", reason="bad_signature")
    sub = subscriber(loops("victim"), keydir, impostor)  # trusts the real pilot's key
    assert not sub.wait_ready(1.5)
    impostor.set("cfg/route2", "to-evil")
    assert wait_for(lambda: metric("zmesh_bus_messages_rejected_total", reason="bad_signature")
                    >= before + 2, timeout=5)
    assert sub.items() == {}


def test_unknown_origin_and_unsigned_bodies_are_dropped(keydir, loops) -> None:
    """A raw PUB speaking our protocol, sending unsigned and unknown-origin updates."""
    sock, port = raw_server(zmq.PUB, keydir, "pilot")
    sub = subscriber(loops("sub"), keydir, None, pub_endpoint=f"tcp://127.0.0.1:{port}",
                     snapshot_endpoint="tcp://127.0.0.1:1")
    time.sleep(0.3)
    unsigned = E.make("cfg/a", E.UPDATE, 1, seq=1, epoch=5, origin="pilot")
    stranger = dataclasses.replace(unsigned, origin="mallory", sig=b"x" * 64)
    before = {r: metric("zmesh_bus_messages_rejected_total", reason=r)
              for r in ("unsigned", "unknown_signer")}
    for _ in range(3):
        sock.send_multipart(unsigned.frames())
        sock.send_multipart(stranger.frames())
    assert wait_for(lambda: all(metric("zmesh_bus_messages_rejected_total", reason=r) >= n + 3
                                for r, n in before.items()), timeout=5)
    assert sub.items() == {}
    sock.close(0)


def test_a_tampered_body_is_dropped_and_the_state_stays_good(keydir, loops) -> None:
    """A man in the middle re-publishes pilot's signed updates with one byte changed."""
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/a", "good")
    mitm_in = raw_client(zmq.SUB, keydir, "nodeagent", pub.pub_endpoint)  # an allowed node
    mitm_in.subscribe(b"cfg/")
    mitm_out, port = raw_server(zmq.PUB, keydir, "pilot")  # it even holds pilot's CURVE key
    stop = threading.Event()
    tampered = []

    def relay() -> None:
        while not stop.is_set():
            if not mitm_in.poll(50):
                continue
            env = E.decode(mitm_in.recv_multipart())
            if env.kind == E.UPDATE and env.topic == "cfg/evil":
                body = bytearray(env.body)
                body[-1] ^= 0x01
                env.body = bytes(body)
                tampered.append(env)
            mitm_out.send_multipart(env.frames())

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        # the victim gets snapshots from the real pilot but live updates through the middle
        sub = subscriber(loops("victim"), keydir, pub, pub_endpoint=f"tcp://127.0.0.1:{port}")
        assert sub.wait_ready(5)
        before = metric("zmesh_bus_messages_rejected_total", reason="bad_signature")
        for i in range(3):
            pub.set("cfg/evil", f"v{i}")
        assert wait_for(lambda: metric("zmesh_bus_messages_rejected_total", reason="bad_signature")
                        >= before + 3, timeout=5)
        assert len(tampered) == 3
        # the re-snapshot that the missing updates cause fetches the genuine values
        assert wait_for(lambda: sub.get("cfg/evil") == "v2", timeout=5)
        assert sub.get("cfg/a") == "good"
    finally:
        stop.set()
        thread.join(5)
        mitm_in.close(0)
        mitm_out.close(0)


def test_keyring_changes_are_picked_up_without_restart(keydir, loops, tmp_path) -> None:
    """A node added to the key directory is admitted on its next connect."""
    ring = tmp_path / "ring"
    shutil.copytree(keydir, ring)
    keys.generate(ring, "late-node")
    shutil.copy(ring / "late-node.key", keydir / "late-node.key")
    try:
        pub = publisher(loops("pub"), keydir)
        pub.set("cfg/x", 1)
        sub = subscriber(loops("late"), ring, pub, name="late-node")
        assert sub.wait_ready(5)
    finally:
        (keydir / "late-node.key").unlink()
