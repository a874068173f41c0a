"""The relay: one upstream connection, many local clients, signatures end to end."""

from __future__ import annotations

import dataclasses

from bus import envelope as E
from bus.keys import Keyring
from bus.relay import Relay
from bus.signing import Verifier
from tests.bus.helpers import fixed_endpoints, publisher, subscriber
from tests.conftest import metric, wait_for, wait_released


def make_relay(loop, keydir, pub, tmp_path, prefix="cfg/") -> Relay:
    ring = Keyring(keydir, "nodeagent")
    return loop.call_sync(lambda: Relay(
        loop, upstream_pub=pub.pub_endpoint, upstream_snapshot=pub.snapshot_endpoint, server="pilot",
        prefix=prefix, keyring=ring, verifier=Verifier(ring.trusted_signers),
        local_pub=f"ipc://{tmp_path}/pub", local_snapshot=f"ipc://{tmp_path}/snap",
        hb_interval=0.2, silence_timeout=1.0))


def local(loop, keydir, relay, prefix, **kw):
    return subscriber(loop, keydir, None, prefix=prefix, name="proxy-a",
                      pub_endpoint=relay.local_pub, snapshot_endpoint=relay.local_snapshot, **kw)


def test_fifty_local_clients_cost_upstream_one_connection(keydir, loops, tmp_path) -> None:
    pub = publisher(loops("pub"), keydir)
    for i in range(50):
        pub.set(f"cfg/p{i}", {"proxy": i})
    relay_loop = loops("relay")
    relay = make_relay(relay_loop, keydir, pub, tmp_path)
    client_loop = loops("clients")
    clients = [local(client_loop, keydir, relay, f"cfg/p{i}") for i in range(50)]
    assert all(c.wait_ready(10) for c in clients)
    assert all(c.get(f"cfg/p{i}") == {"proxy": i} for i, c in enumerate(clients))
    assert all(len(c.items()) in (1, 11) for c in clients)  # cfg/p1 also covers cfg/p10..p19
    assert pub.monitor.peers == 1  # one upstream connection for fifty clients
    assert (tmp_path / "pub").stat().st_mode & 0o777 == 0o600

    for i in range(50):
        pub.set(f"cfg/p{i}", {"proxy": i, "v": 2})
    pub.delete("cfg/p7")
    assert wait_for(lambda: all(c.get(f"cfg/p{i}") == {"proxy": i, "v": 2}
                                for i, c in enumerate(clients) if i != 7), timeout=10)
    assert wait_for(lambda: clients[7].get("cfg/p7") is None)


def test_a_relay_cannot_forge_config(keydir, loops, tmp_path) -> None:
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/route", "genuine")
    relay = make_relay(loops("relay"), keydir, pub, tmp_path)
    client = local(loops("client"), keydir, relay, "cfg/")
    assert client.wait_ready(10)
    before = metric("zmesh_bus_messages_rejected_total", reason="bad_signature")
    # the relay (compromised) alters a signed update before passing it on
    genuine = relay.publisher.loop.call_sync(lambda: relay.publisher.store.entries["cfg/route"])
    forged = dataclasses.replace(genuine, body=E.pack_body("evil"), seq=genuine.seq + 1)
    relay.publisher.forward(forged)
    assert wait_for(lambda: metric("zmesh_bus_messages_rejected_total", reason="bad_signature") > before)
    # it cannot sign as pilot either: its own key is not pilot's
    own = Keyring(keydir, "nodeagent").signing_key()
    fake = dataclasses.replace(genuine, body=E.pack_body("evil2"), seq=genuine.seq + 2)
    fake.sig = own.sign(b"anything")
    relay.publisher.forward(fake)
    assert wait_for(lambda: metric("zmesh_bus_messages_rejected_total", reason="bad_signature") > before + 1)
    assert client.get("cfg/route") == "genuine"


def test_a_relay_follows_an_upstream_restart(keydir, loops, tmp_path) -> None:
    pub_loop = loops("pub")
    endpoints = fixed_endpoints()
    pub = publisher(pub_loop, keydir, **endpoints)
    pub.set("cfg/a", 1)
    pub.set("cfg/old", 1)
    relay = make_relay(loops("relay"), keydir, pub, tmp_path)
    client = local(loops("client"), keydir, relay, "cfg/")
    assert client.wait_ready(10)
    pub_loop.stop()
    wait_released(*endpoints.values())
    new = publisher(loops("pub2"), keydir, **endpoints)
    new.set("cfg/a", 2)
    assert wait_for(lambda: client.items() == {"cfg/a": 2}, timeout=10), client.items()

