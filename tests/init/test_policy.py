"""The decider's decisions, without sockets: proxy config -> DestinationPolicy -> verdict and mark."""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from pathlib import Path

import pytest

from dataplane.init.decider import ConfigWatch, decide
from dataplane.init.policy import MARK_MASK, DestinationPolicy, Verdict, merged_marks, parse_destination
from tests.conftest import metric

CONFIG = {
    "version": "v1",
    "listeners": {
        "outbound_traffic_policy": "ALLOW_ANY",
        "outbound": [
            {"name": "reviews_9080", "service": "reviews", "addresses": ["10.96.0.10"], "port": 9080},
            {"name": "db_5432", "service": "db", "addresses": ["fd00:96::20"], "port": 5432},
            {"name": "ext_443", "service": "ext", "addresses": ["192.168.50.0/24"], "port": 443},
            {"name": "headless_7000", "service": "headless", "addresses": [], "port": 7000},
        ],
        "inbound": [{"name": "inbound_8080", "port": 8080}],
    },
    "clusters": {
        "outbound|7000||headless": {"name": "outbound|7000||headless", "direction": "outbound"},
        "outbound|80||dns": {"name": "outbound|80||dns", "direction": "outbound"},
        "inbound|8080||": {"name": "inbound|8080||", "direction": "inbound"},
    },
    "endpoints": {
        "outbound|7000||headless": [{"address": "10.1.0.7", "port": 7000}],
        "outbound|80||dns": [{"address": "api.example.com", "port": 80}],
        "inbound|8080||": [{"address": "10.1.0.99", "port": 8080}],
    },
}


def registry_only() -> dict:
    return {**CONFIG, "listeners": {**CONFIG["listeners"], "outbound_traffic_policy": "REGISTRY_ONLY"}}


def ipv4_syn(dst: str, port: int, *, ihl: int = 5, proto: int = 6) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 40, 1, 0, 64, proto, 0,
                         ipaddress.IPv4Address("10.1.0.1").packed, ipaddress.IPv4Address(dst).packed)
    return header + b"\0" * ((ihl - 5) * 4) + struct.pack("!HH", 40000, port) + b"\0" * 16


def ipv6_syn(dst: str, port: int, *, next_header: int = 6) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, 20, next_header, 64, ipaddress.IPv6Address("fd00::1").packed,
                         ipaddress.IPv6Address(dst).packed)
    return header + struct.pack("!HH", 40000, port) + b"\0" * 16


def test_known_destinations_go_to_the_proxy() -> None:
    policy = DestinationPolicy.from_config(CONFIG)
    assert policy.decide("10.96.0.10", 9080) is Verdict.REDIRECT
    assert policy.decide("10.96.0.10", 22) is Verdict.REDIRECT  # any port of a VIP
    assert policy.decide("fd00:96::20", 5432) is Verdict.REDIRECT
    assert policy.decide("192.168.50.7", 443) is Verdict.REDIRECT  # a ServiceEntry CIDR
    assert policy.decide("10.1.0.7", 7000) is Verdict.REDIRECT  # an endpoint of an outbound cluster
    assert policy.decide("10.1.0.7", 7001) is Verdict.PASS  # ... on its own port only


def test_unknown_destinations_follow_the_outbound_traffic_policy() -> None:
    allow = DestinationPolicy.from_config(CONFIG)
    deny = DestinationPolicy.from_config(registry_only())
    for addr, port in (("8.8.8.8", 443), ("10.1.0.99", 8080), ("2001:db8::1", 80)):  # 10.1.0.99: inbound only
        assert allow.decide(addr, port) is Verdict.PASS
        assert deny.decide(addr, port) is Verdict.REJECT
    assert deny.decide("10.96.0.10", 9080) is Verdict.REDIRECT
    assert (allow.policy, deny.policy) == ("ALLOW_ANY", "REGISTRY_ONLY")


def test_no_config_yet_sends_everything_to_the_proxy() -> None:
    assert DestinationPolicy().decide("8.8.8.8", 443) is Verdict.REDIRECT
    assert DestinationPolicy.from_config({}).decide("8.8.8.8", 443) is Verdict.PASS  # Istio's default policy
    with pytest.raises(ValueError):
        DestinationPolicy.from_config({"listeners": {"outbound_traffic_policy": "SOMETIMES"}})


def test_parse_destination() -> None:
    assert parse_destination(ipv4_syn("10.96.0.10", 9080)) == ("10.96.0.10", 9080)
    assert parse_destination(ipv4_syn("10.96.0.10", 9080, ihl=7)) == ("10.96.0.10", 9080)  # IP options
    assert parse_destination(ipv6_syn("fd00:96:0::20", 5432)) == ("fd00:96::20", 5432)
    assert parse_destination(ipv4_syn("10.96.0.10", 53, proto=17)) is None
    assert parse_destination(ipv6_syn("fd00::2", 80, next_header=0)) is None  # an extension header
    assert parse_destination(b"") is None
    assert parse_destination(ipv4_syn("10.96.0.10", 9080)[:22]) is None


def test_decide_packet_and_marks() -> None:
    deny = DestinationPolicy.from_config(registry_only())
    assert deny.decide_packet(ipv6_syn("fd00:96::20", 5432)) is Verdict.REDIRECT
    assert deny.decide_packet(ipv4_syn("8.8.8.8", 443)) is Verdict.REJECT
    assert deny.decide_packet(b"\x00garbage") is Verdict.REDIRECT  # unreadable: the proxy decides
    assert len({v.mark for v in Verdict}) == 3 and all(v.mark & ~MARK_MASK == 0 for v in Verdict)
    assert merged_marks(0xFFFFFFFF, Verdict.REDIRECT) == (0xFFFFFFFF & ~MARK_MASK) | Verdict.REDIRECT.mark
    assert merged_marks(0x4000, Verdict.PASS) == 0x4000 | Verdict.PASS.mark  # kube-proxy's bit survives


class FakePacket:
    def __init__(self, payload: bytes, mark: int = 0) -> None:
        self.payload, self.mark, self.accepted = payload, mark, False

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.accepted = True


def test_decide_always_accepts_with_a_mark_and_counts() -> None:
    policy = DestinationPolicy.from_config(registry_only())
    before = metric("zmesh_init_verdicts_total", verdict="reject")
    packet = FakePacket(ipv4_syn("8.8.8.8", 443), mark=0x4000)
    assert decide(policy, packet) is Verdict.REJECT
    assert packet.accepted and packet.mark == 0x4000 | Verdict.REJECT.mark  # filter REJECTs it
    assert metric("zmesh_init_verdicts_total", verdict="reject") == before + 1


def test_config_watch_reloads_on_change_and_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "proxy.json"
    watch = ConfigWatch(path)
    assert watch.poll().decide("8.8.8.8", 443) is Verdict.REDIRECT  # no file yet
    path.write_text(json.dumps(CONFIG))
    assert watch.poll().decide("8.8.8.8", 443) is Verdict.PASS
    tmp = tmp_path / "new.json"
    tmp.write_text(json.dumps(registry_only()))
    os.replace(tmp, path)  # how a writer should update it: a new inode
    assert watch.poll().decide("8.8.8.8", 443) is Verdict.REJECT
    path.write_text("{not json")
    assert watch.poll().decide("8.8.8.8", 443) is Verdict.REJECT  # broken: the last good one stays
    yaml_path = tmp_path / "proxy.yaml"
    yaml_path.write_text("listeners:\n  outbound_traffic_policy: ALLOW_ANY\n")
    assert ConfigWatch(yaml_path).poll().decide("8.8.8.8", 443) is Verdict.PASS


def test_fast_path_marks_exactly_the_known_destinations_per_family() -> None:
    policy = DestinationPolicy.from_config(CONFIG)
    mark = "-j MARK --set-xmark 0x100000/0x300000"
    rest = "-m mark --mark 0x0/0x300000 -j MARK --set-xmark {:#x}/0x300000"  # what is still unmarked
    assert policy.fast_path(4) == [f"-d 192.168.50.0/24 {mark}", f"-d 10.96.0.10/32 {mark}",
                                   f"-d 10.1.0.7/32 -p tcp --dport 7000 {mark}",  # an endpoint: its port
                                   rest.format(Verdict.PASS.mark)]
    assert policy.fast_path(6) == [f"-d fd00:96::20/128 {mark}", rest.format(Verdict.PASS.mark)]
    assert DestinationPolicy.from_config(registry_only()).fast_path(6)[-1] == rest.format(Verdict.REJECT.mark)
    assert DestinationPolicy().fast_path(4) == []  # no config: the queue sees everything


def test_decide_packet_agrees_with_decide_on_every_known_kind() -> None:
    policy = DestinationPolicy.from_config(registry_only())
    for dst, port in (("10.96.0.10", 1), ("192.168.50.7", 443), ("10.1.0.7", 7000), ("10.1.0.7", 7001),
                      ("8.8.8.8", 443)):
        assert policy.decide_packet(ipv4_syn(dst, port)) is policy.decide(dst, port)
    assert policy.decide_packet(ipv6_syn("fd00:96::20", 9)) is Verdict.REDIRECT
    assert policy.decide_packet(ipv6_syn("fd00::99", 9)) is Verdict.REJECT
