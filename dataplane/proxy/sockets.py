"""Socket set-up for the proxy: shared listeners, original destinations, non-blocking connects.

Listeners set SO_REUSEPORT so every worker process binds its own socket on the same port
and the kernel spreads connections over them (no shared accept queue, no thundering herd).
TCP_NODELAY is set on the listener: Linux copies it to every accepted socket, which saves a
setsockopt per connection (a proxy must never hold back a small write behind Nagle).
"""

from __future__ import annotations

import errno
import socket
import struct

SO_ORIGINAL_DST = 80       # linux/netfilter_ipv4.h, on SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, on SOL_IPV6
SOL_IPV6 = getattr(socket, "SOL_IPV6", socket.IPPROTO_IPV6)
SO_MARK = getattr(socket, "SO_MARK", 36)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")        # family (host order, skipped), port, addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")    # family, port, flowinfo, addr, scope id


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listener(host: str, port: int, *, backlog: int = 4096, reuseport: bool = True) -> socket.socket:
    """A non-blocking TCP listener; with `reuseport`, worker processes can each bind the same port."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect before an iptables REDIRECT/DNAT sent it to us.

    Returns None when conntrack has no NAT record for the connection (it was not redirected).
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, addr = _SOCKADDR_IN6.unpack(raw)
            return socket.inet_ntop(socket.AF_INET6, addr), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        port, addr = _SOCKADDR_IN.unpack(raw)
        return socket.inet_ntop(socket.AF_INET, addr), port
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise


def connect(addr: tuple[str, int], *, mark: int = 0) -> tuple[socket.socket, int]:
    """Start a non-blocking connect; returns the socket and 0, EINPROGRESS or the failing errno.

    `mark` sets SO_MARK (needs CAP_NET_ADMIN) so iptables can exempt the proxy's own
    upstream connections from interception. Any errno other than 0/EINPROGRESS means the
    connect already failed; the caller closes the socket.
    """
    sock = socket.socket(_family(addr[0]), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        err = sock.connect_ex(addr)
    except OSError as e:
        err = e.errno or errno.EINVAL
    return sock, err


def errno_name(err: int) -> str:
    """'connection_refused'-style detail for an errno, for access logs and close reasons."""
    return {
        errno.ECONNREFUSED: "connection_refused",
        errno.ETIMEDOUT: "connect_timeout",
        errno.EHOSTUNREACH: "host_unreachable",
        errno.ENETUNREACH: "network_unreachable",
        errno.ECONNRESET: "connection_reset",
        errno.EPIPE: "broken_pipe",
    }.get(err) or errno.errorcode.get(err, str(err)).lower()
