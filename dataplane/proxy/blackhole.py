"""Destinations the proxy never connects to: its own listeners (they go to Istio's BlackHoleCluster).

Why: a connection to one of the proxy's own listening addresses comes straight back into the proxy.
When the listener that takes it passes it through to its original destination (a request for an
unknown Host in explicit mode, `curl 127.0.0.1:15001` in a pod, `curl <pod>:15006` from outside),
that destination is the listener again, and the worker connects to itself until it runs out of file
descriptors. Istio's sidecar has a blackhole filter chain for connections addressed to 15001 on the
outbound listener and 15006 on the inbound one; this proxy checks every upstream connect instead
(HTTP pools, L4 forwarding, passthrough or not), which covers those and any cluster endpoint that
names one of our own addresses.

Ours, for `OwnListeners.owns(host, port)`:
- every address a worker listens on that may pass a connection through (transparent 15001 and 15006,
  explicit mode's outbound listeners) and the admin and stats endpoints. Explicit mode's inbound
  listener is not: it stands for the app's port (peers' endpoints name it) and always forwards to
  the app, so a workload calling its own service through it (Istio's hairpin) cannot loop;
- Istio's reserved ports (RESERVED_PORTS: admin 15000, 15001, 15006, the agent's 15020 and 15021,
  stats 15090) on any local address, whoever listens there.
A listener bound to a wildcard (0.0.0.0; :: also takes IPv4) owns its port on every local address of
its family; one bound to a specific address only there. Local means loopback (127.0.0.0/8, ::1), the
unspecified address (a connect to 0.0.0.0 reaches this host) or an address the kernel holds (the pod
IP): `kernel_local` asks the kernel by binding a UDP socket to it, which happens only for destinations
on one of the ports above, never on the usual path. An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is
its IPv4 address.

What happens to such a connection: HTTP gets a local 502 (Istio's answer for BlackHoleCluster routes)
with response flag UH (no host to send it to); L4 is closed with flag UH. Both are counted under
destination_service "BlackHoleCluster" (istio_requests_total / istio_tcp_connections_*) and as Envoy's
`cluster.BlackHoleCluster.upstream_cx_none_healthy` (envoy_cluster_upstream_cx_none_healthy), and
the access log has one line per request or connection; the warning is one line per burst, so a flood
of them cannot fill the disk.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from bus.logs import BurstLog, Log
from dataplane.proxy.stats import Stats
from meshapi.ports import RESERVED as RESERVED_PORTS

BLACKHOLE = "BlackHoleCluster"
HTTP_STATUS = 502
HTTP_BODY = b"blackholed: the destination is this proxy's own listener"
COUNTER = ("cluster", BLACKHOLE, "upstream_cx_none_healthy")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_burst = BurstLog(Log("proxy.blackhole"))


def parse(host: str) -> IPAddress | None:
    """`host` as an address (IPv4-mapped IPv6 as IPv4, a zone dropped); None for a name."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return ipaddress.IPv4Address("127.0.0.1") if host == "localhost" else None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def kernel_local(ip: IPAddress) -> bool:
    """Whether the kernel holds `ip` in this network namespace: only a local address can be bound."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


class OwnListeners:
    """The proxy's own listening addresses, and whether a destination is one of them (sans IO:
    `is_local` is the only question asked outside, and tests answer it from a set)."""

    def __init__(self, is_local: Callable[[IPAddress], bool] = kernel_local,
                 reserved: frozenset[int] = RESERVED_PORTS) -> None:
        self.is_local = is_local
        self.reserved = reserved
        self._bound: dict[int, list[IPAddress]] = {}  # port -> addresses bound on it (a list: a multiset)

    def add(self, host: str, port: int) -> None:
        """A listener of ours is bound at host:port."""
        ip = parse(host)
        if ip is not None:
            self._bound.setdefault(port, []).append(ip)

    def discard(self, host: str, port: int) -> None:
        """That listener is closed."""
        ips = self._bound.get(port)
        ip = parse(host)
        if ips is not None and ip in ips:
            ips.remove(ip)
            if not ips:
                del self._bound[port]

    def owns(self, host: str, port: int) -> bool:
        """Whether a connection to host:port would reach one of our own listeners."""
        ips = self._bound.get(port)
        if ips is None and port not in self.reserved:
            return False  # the usual case: one dict lookup, one set lookup
        ip = parse(host)
        if ip is None:
            return False
        if ip.is_unspecified or (ips is not None and ip in ips):
            return True
        local: bool | None = None  # asked at most once
        for bound in ips or ():
            if bound.is_unspecified and (bound.version == ip.version or bound.version == 6):
                local = self._local(ip)
                if local:
                    return True
        if port in self.reserved:
            return local if local is not None else self._local(ip)
        return False

    def _local(self, ip: IPAddress) -> bool:
        return ip.is_loopback or ip.is_unspecified or self.is_local(ip)


def refused(stats: Stats | None, destination: tuple[str, int], protocol: str, cluster: str) -> None:
    """Count a connection that was not made because `destination` is ours, and say so (per burst)."""
    if stats is not None:
        stats.inc(COUNTER)
    _burst.event("own-listener", "blackholed a connection to this proxy's own listener",
                 destination=f"{destination[0]}:{destination[1]}", protocol=protocol, cluster=cluster)
