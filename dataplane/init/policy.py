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
        """The verdict for a queued SYN; one we cannot read goes to the proxy, as it would without us."""
        dst = parse_destination(packet)
        return Verdict.REDIRECT if dst is None else self.decide(*dst)

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

