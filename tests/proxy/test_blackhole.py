"""Which destinations are the proxy's own listeners (blackhole.py) and the downstream connection
bound (connlimit.py): the decisions alone, without sockets."""

from __future__ import annotations

import ipaddress

import pytest

from dataplane.proxy.blackhole import COUNTER, OwnListeners, parse
from dataplane.proxy.connlimit import RECOUNT, ConnectionLimit
from dataplane.proxy.stats import Stats, Workload

POD_IP, POD_IP6 = "10.1.2.3", "fd00::3"
LOCAL = {ipaddress.ip_address(POD_IP), ipaddress.ip_address(POD_IP6)}


def own(*bound: tuple[str, int]) -> OwnListeners:
    listeners = OwnListeners(is_local=LOCAL.__contains__)
    for host, port in bound:
        listeners.add(host, port)
    return listeners


def test_parse_takes_ipv4_mapped_addresses_as_ipv4_and_leaves_names() -> None:
    assert parse("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert parse("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse("localhost") == ipaddress.ip_address("127.0.0.1")
    assert parse("reviews.default.svc") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "0.0.0.0", POD_IP, "::ffff:" + POD_IP,
                                  "::ffff:127.0.0.1"])
def test_a_wildcard_ipv4_listener_owns_its_port_on_every_local_ipv4_address(host: str) -> None:
    assert own(("0.0.0.0", 40001)).owns(host, 40001)


@pytest.mark.parametrize("host", ["10.1.2.4", "192.0.2.1", "::1", POD_IP6])
def test_a_wildcard_ipv4_listener_does_not_own_other_hosts_or_ipv6(host: str) -> None:
    assert not own(("0.0.0.0", 40001)).owns(host, 40001)


@pytest.mark.parametrize("host", ["::1", "::", POD_IP6, "127.0.0.1", POD_IP])
def test_a_wildcard_ipv6_listener_is_dual_stack(host: str) -> None:
    assert own(("::", 40001)).owns(host, 40001)


def test_a_listener_bound_to_one_address_owns_only_that_address() -> None:
    listeners = own(("127.0.0.5", 9080), ("::1", 9081))
    assert listeners.owns("127.0.0.5", 9080)
    assert listeners.owns("0.0.0.0", 9080)  # a connect to 0.0.0.0 reaches whatever listens locally
    assert not listeners.owns("127.0.0.6", 9080)  # another loopback pod's address
    assert not listeners.owns(POD_IP, 9080)
    assert listeners.owns("::1", 9081) and listeners.owns("0:0:0:0:0:0:0:1", 9081)
    assert not listeners.owns("127.0.0.1", 9081)
    assert not listeners.owns("127.0.0.5", 9082)  # another port: the usual case


@pytest.mark.parametrize("port", [15000, 15001, 15006, 15020, 15021, 15090])
def test_istios_reserved_ports_are_ours_on_any_local_address_even_unbound(port: int) -> None:
    listeners = own()
    for host in ("127.0.0.1", "127.3.0.1", "::1", "::ffff:127.0.0.1", POD_IP, POD_IP6, "0.0.0.0"):
        assert listeners.owns(host, port), host
    assert not listeners.owns("10.9.9.9", port)  # another pod's sidecar protects itself
    assert not listeners.owns("svc.example", port)


def test_a_closed_listener_is_no_longer_ours_and_a_multiset_keeps_the_other() -> None:
    listeners = own(("127.0.0.1", 40002), ("127.0.0.1", 40002))
    listeners.discard("127.0.0.1", 40002)
    assert listeners.owns("127.0.0.1", 40002)
    listeners.discard("127.0.0.1", 40002)
    assert not listeners.owns("127.0.0.1", 40002)
    listeners.discard("127.0.0.1", 40002)  # twice: nothing to do
    assert not listeners.owns("127.0.0.1", 40002)


def test_the_kernel_is_asked_only_for_destinations_on_our_ports() -> None:
    asked = []

    def is_local(ip: object) -> bool:
        asked.append(ip)
        return False

    listeners = OwnListeners(is_local=is_local)
    listeners.add("0.0.0.0", 40003)
    assert not listeners.owns("10.0.0.1", 8080) and not listeners.owns("127.0.0.1", 8080)
    assert asked == []
    assert not listeners.owns("10.0.0.1", 40003) and asked == [ipaddress.ip_address("10.0.0.1")]


class Fds:
    """A fake fd table: fd -> inode of what it holds now."""

    def __init__(self) -> None:
        self.table: dict[int, int] = {}
        self.next_ino = 1000

    def open(self, fd: int) -> int:
        self.next_ino += 1
        self.table[fd] = self.next_ino
        return fd

    def identity(self, fd: int) -> int | None:
        return self.table.get(fd)


def test_the_limit_closes_connections_past_the_bound_counts_and_recovers() -> None:
    fds, stats = Fds(), Stats(Workload())
    limit = ConnectionLimit(3, stats, identity=fds.identity)
    now = 100.0
    assert all(limit.admit(fds.open(fd), now, "0.0.0.0_15001") for fd in (10, 11, 12))
    assert not limit.admit(fds.open(13), now, "0.0.0.0_15001")
    assert not limit.admit(fds.open(14), now, "127.0.0.1_9080")
    assert limit.rejected == 2
    assert stats.counters[("listener", "0.0.0.0_15001", "downstream_global_cx_overflow")] == 1
    assert stats.counters[("listener", "127.0.0.1_9080", "downstream_global_cx_overflow")] == 1
    del fds.table[11]  # a connection closed
    del fds.table[13], fds.table[14]  # (the caller closed the refused ones)
    assert not limit.admit(fds.open(15), now, "0.0.0.0_15001")  # recounted at `now` already: not yet
    del fds.table[15]
    assert limit.admit(fds.open(16), now + 2 * RECOUNT, "0.0.0.0_15001")  # a recount sees the freed place
    assert limit.recount(now + 3 * RECOUNT) == 3


def test_an_fd_number_handed_out_again_means_its_last_holder_is_gone() -> None:
    fds = Fds()
    limit = ConnectionLimit(2, identity=fds.identity)
    assert limit.admit(fds.open(10), 0.0, "l") and limit.admit(fds.open(11), 0.0, "l")
    fds.open(10)  # 10 was closed and the kernel gave the number to the next accepted socket
    assert limit.admit(10, 0.0, "l")
    fds.table[11] = 1  # 11 now holds another file (an upstream socket, a pipe): not ours any more
    assert limit.recount(1.0) == 1


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionLimit(0)


def test_the_blackhole_counter_is_envoys_none_healthy_stat_for_the_blackhole_cluster() -> None:
    stats = Stats(Workload())
    stats.inc(COUNTER)
    assert "envoy_cluster_upstream_cx_none_healthy{cluster_name=\"BlackHoleCluster\"} 1" in stats.render()
