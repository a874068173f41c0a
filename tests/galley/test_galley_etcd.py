"""Galley over a real etcd (Debian's etcd-server), through a restart and a compaction."""

from __future__ import annotations

from controlplane.galley.etcd import EtcdClient
from controlplane.galley.service import Galley
from controlplane.galley.source_etcd import EtcdSource
from tests.bus.helpers import publisher, subscriber
from tests.conftest import wait_for
from tests.tcpproxy import TcpProxy

PREFIX = "/zmesh/config/"
SE = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{name}.example.com]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: DNS
"""


def test_etcd_source_through_restart_and_compaction(etcd, keydir, loops) -> None:
    client = EtcdClient(etcd.endpoint)
    client.put(PREFIX + "a", SE.format(name="a"))
    loop = loops("galley")
    pub = publisher(loop, keydir)
    galley = Galley(loop, pub)
    link = TcpProxy(etcd.client_port)  # galley reaches etcd through a link the test can cut
    source = EtcdSource(loop, f"http://127.0.0.1:{link.port}", PREFIX, galley.on_unit, max_backoff=0.2)
    source.start()
    sub = subscriber(loops("sub"), keydir, pub, prefix="galley/ServiceEntry/")
    try:
        key = "galley/ServiceEntry/default/{}"
        assert wait_for(lambda: sub.get(key.format("a")) is not None, timeout=10)
        client.put(PREFIX + "b", SE.format(name="b"))
        assert wait_for(lambda: sub.get(key.format("b")) is not None, timeout=5)

        # an invalid value is refused; the last valid one stays
        client.put(PREFIX + "b", SE.format(name="b").replace("DNS", "SOMETIMES"))
        assert wait_for(lambda: galley.store.rejected_units() == [PREFIX + "b"], timeout=5)
        assert sub.get(key.format("b"))["spec"]["resolution"] == "DNS"

        # etcd restarts: the watch reconnects and resumes from its revision
        etcd.stop()
        assert wait_for(lambda: source.reconnects >= 1, timeout=10)
        etcd.start()
        client.put(PREFIX + "c", SE.format(name="c"))
        assert wait_for(lambda: sub.get(key.format("c")) is not None, timeout=10)
        assert source.reloads == 1  # resumed, not reloaded

        # while galley is cut off, keys change and the history is compacted away
        link.cut()
        source_rev = source.revision
        client.delete(PREFIX + "a")
        rev = client.put(PREFIX + "d", SE.format(name="d"))
        client.compact(rev)
        assert rev > source_rev + 1
        link.heal()
        assert wait_for(lambda: sub.get(key.format("d")) is not None, timeout=15)
        assert wait_for(lambda: sub.get(key.format("a")) is None, timeout=5)
        assert source.reloads == 2  # the compaction forced a full reload
    finally:
        source.stop()
        link.close()
