"""Which new outbound connections the proxy must see (sans-IO; `decider.py` is the NFQUEUE shell).

Plain Istio sends every outbound connection through the proxy, even to destinations the proxy only
passes through (ALLOW_ANY) or refuses (REGISTRY_ONLY). With `--nfqueue`, each new connection's SYN
is decided here first, and the verdict travels as a packet mark the iptables rules act on:

    REDIRECT  a destination the proxy config knows: nat redirects it to 15001
    PASS      an unknown destination under ALLOW_ANY: nat leaves it alone, it goes direct
    REJECT    an unknown destination under REGISTRY_ONLY: filter answers it with a TCP reset

A destination is known when it is a service VIP of an outbound listener (any port: the proxy decides
what a port it does not serve means) or an (address, port) endpoint of an outbound cluster (a client
that dials a pod IP must not skip the proxy's mTLS). Until a config arrives every
connection is REDIRECTed, which is what plain Istio does.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MARK_MASK = 0x300000  # two bits of the packet mark are ours; the others are left as they were


class Verdict(enum.Enum):
    REDIRECT = "redirect"
    PASS = "pass"
    REJECT = "reject"

    @property
    def mark(self) -> int:
        return _MARKS[self]


_MARKS = {Verdict.REDIRECT: 0x100000, Verdict.PASS: 0x200000, Verdict.REJECT: 0x300000}
TCP = 6
_PORTS = struct.Struct("!HH")
_PORT = struct.Struct("!H")


def _ip(text: str) -> str | None:
    """The canonical text of an address, or None for a hostname (a DNS cluster's endpoint)."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


@dataclass(frozen=True)
class DestinationPolicy:
    """The verdict for each (address, port), built from one proxy config in pilot's schema."""

    known: frozenset[tuple[str, int]] = frozenset()  # endpoints of outbound clusters
    vips: frozenset[str] = frozenset()
    vip_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    unknown: Verdict = Verdict.REDIRECT
    policy: str = field(default="", compare=False)  # for logs: ALLOW_ANY, REGISTRY_ONLY or "" (no config)
    # the same sets as packed bytes (address, address + port), so a SYN is decided without parsing it
    _vips_raw: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _known_raw: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pack = ipaddress.ip_address
        object.__setattr__(self, "_vips_raw", frozenset(pack(a).packed for a in self.vips))
        object.__setattr__(self, "_known_raw",
                           frozenset(pack(a).packed + _PORT.pack(p) for a, p in self.known))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DestinationPolicy:
        listeners = config.get("listeners") or {}
        policy = listeners.get("outbound_traffic_policy") or "ALLOW_ANY"
        if policy not in ("ALLOW_ANY", "REGISTRY_ONLY"):
            raise ValueError(f"unknown outbound_traffic_policy {policy!r}")
        known: set[tuple[str, int]] = set()
        vips: set[str] = set()
        networks = []
        for listener in listeners.get("outbound") or []:
            for address in listener.get("addresses") or []:
                if "/" in address:  # a ServiceEntry may give a CIDR
                    networks.append(ipaddress.ip_network(address, strict=False))
                elif ip := _ip(address):
                    vips.add(ip)
        clusters = config.get("clusters") or {}
        for name, endpoints in (config.get("endpoints") or {}).items():
            if (clusters.get(name) or {}).get("direction") != "outbound":
                continue
            for ep in endpoints:
                if ip := _ip(str(ep.get("address", ""))):
                    known.add((ip, int(ep["port"])))
        unknown = Verdict.PASS if policy == "ALLOW_ANY" else Verdict.REJECT
        return cls(frozenset(known), frozenset(vips), tuple(networks), unknown, policy)

    def decide(self, address: str, port: int) -> Verdict:
        if address in self.vips or (address, port) in self.known:
            return Verdict.REDIRECT
        if self.vip_networks and any(ipaddress.ip_address(address) in n for n in self.vip_networks):
            return Verdict.REDIRECT
        return self.unknown

    def decide_packet(self, packet: bytes) -> Verdict:
        """The verdict for a queued SYN; one we cannot read goes to the proxy, as it would without us.

        The hot path of the decider (once per new connection): set lookups on slices of the packet,
        no address objects unless the config has CIDRs.
        """
        n = len(packet)
        if n >= 20 and packet[0] >> 4 == 4:
            ihl = (packet[0] & 0x0F) * 4
            if packet[9] != TCP or n < ihl + 4:
                return Verdict.REDIRECT
            addr, port = packet[16:20], packet[ihl + 2:ihl + 4]
        elif n >= 44 and packet[0] >> 4 == 6:
            if packet[6] != TCP:
                return Verdict.REDIRECT
            addr, port = packet[24:40], packet[42:44]
        else:
            return Verdict.REDIRECT
        if addr in self._vips_raw or addr + port in self._known_raw:
            return Verdict.REDIRECT
        if self.vip_networks and any(ipaddress.ip_address(addr) in net for net in self.vip_networks):
            return Verdict.REDIRECT
        return self.unknown

    def fast_path(self, family: int) -> list[str]:
        """iptables rule specs (rules.known_text) that give every SYN its verdict mark in the kernel:
        each known destination REDIRECT, then anything still unmarked the policy's verdict for the
        unknown. Without a config, nothing: the queue sees everything. Sorted, so an unchanged config
        gives the same text."""
        if not self.policy:
            return []
        redirect = f"-j MARK --set-xmark {Verdict.REDIRECT.mark:#x}/{MARK_MASK:#x}"
        nets = sorted({n.compressed for n in self.vip_networks if n.version == family})
        hosts = sorted(ipaddress.ip_network(a).compressed for a in self.vips
                       if ipaddress.ip_address(a).version == family)
        known = sorted((ipaddress.ip_network(a).compressed, p) for a, p in self.known
                       if ipaddress.ip_address(a).version == family and a not in self.vips)
        return ([f"-d {d} {redirect}" for d in [*nets, *hosts]]
                + [f"-d {d} -p tcp --dport {p} {redirect}" for d, p in known]
                + [f"-m mark --mark 0x0/{MARK_MASK:#x} -j MARK --set-xmark {self.unknown.mark:#x}/"
                   f"{MARK_MASK:#x}"])

    def count(self) -> int:
        """How many destinations it knows (for logs)."""
        return len(self.known) + len(self.vips) + len(self.vip_networks)


def parse_destination(packet: bytes) -> tuple[str, int] | None:
    """(destination address, destination port) of an IPv4 or IPv6 TCP packet; None for anything else.

    IPv6 extension headers are not walked: a locally generated SYN does not carry them.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != TCP or len(packet) < ihl + 4:
            return None
        return ipaddress.IPv4Address(packet[16:20]).compressed, _PORTS.unpack_from(packet, ihl)[1]
    if version == 6 and len(packet) >= 44:
        if packet[6] != TCP:
            return None
        return ipaddress.IPv6Address(packet[24:40]).compressed, _PORTS.unpack_from(packet, 40)[1]
    return None


def merged_marks(old: int, verdict: Verdict) -> int:
    """The packet's new mark: our bits set to the verdict's, everybody else's kept."""
    return (old & ~MARK_MASK & 0xFFFFFFFF) | verdict.mark

