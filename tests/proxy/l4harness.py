"""A bare L4 proxy for tests: a reactor, an accept loop and tcp.py's Forwarder, with no control
plane. The sidecar's own accept path is dataplane/proxy/listeners.py (`meshctl proxy`); this
harness tests the Forwarder on its own (tests/proxy/test_tcp.py) and iptables interception in
network namespaces (tests/init, tests/proxy/test_interception.py):

    python -m tests.proxy.l4harness --listen 127.0.0.1:PORT (--upstream HOST:PORT | --transparent)

`--transparent` forwards every connection to its original destination (SO_ORIGINAL_DST). It prints
"listening HOST:PORT" once bound and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from bus.logs import Log, configure
from dataplane.proxy import sockets
from dataplane.proxy.acceptor import Acceptor
from dataplane.proxy.reactor import Reactor
from dataplane.proxy.tcp import Forwarder

Address = tuple[str, int]
# (original destination or None, listener port) -> upstream address, or a response flag / None
# ("UH" by default) when there is no upstream for it
Chooser = Callable[[Address | None, int], Address | str | None]


_log = Log("l4harness")


class L4Listener:
    """Accepts on `sock` (from `sockets.listener`) and forwards each connection it can route."""

    def __init__(self, reactor: Reactor, sock: socket.socket, choose_upstream: Chooser, *,
                 transparent: bool = False, connect_timeout: float = 10.0,
                 on_close: Callable[[Forwarder], Any] | None = None, **forwarder: Any) -> None:
        """`forwarder`: keyword arguments for every Forwarder (idle_timeout, mark, splice)."""
        self.reactor, self.sock, self.port = reactor, sock, sock.getsockname()[1]
        self.choose_upstream, self.transparent = choose_upstream, transparent
        self.connect_timeout, self.on_close, self.forwarder = connect_timeout, on_close, forwarder
        self.connections: set[Forwarder] = set()
        self.acceptor = Acceptor(reactor, sock, self._serve)

    def close(self) -> None:
        """Stop accepting; connections in flight carry on."""
        self.acceptor.close()

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        orig = sockets.original_dst(sock) if self.transparent else None
        fwd = Forwarder(self.reactor, sock, on_close=self._closed, downstream_addr=addr[:2], orig_dst=orig,
                        **self.forwarder)
        self.connections.add(fwd)
        try:
            target = self.choose_upstream(orig, self.port)
        except Exception:
            _log.error("choose_upstream failed", exc_info=True, port=self.port)
            target = "NR"
        if isinstance(target, tuple):
            fwd.connect(target, self.connect_timeout)
        else:
            fwd.reject(target or "UH", "no_upstream")

    def _closed(self, fwd: Forwarder) -> None:
        self.connections.discard(fwd)
        if self.on_close is not None:
            self.on_close(fwd)


def _hostport(addr: Address | None) -> str:
    return "-" if addr is None else f"{addr[0]}:{addr[1]}"


def _log_connection(fwd: Forwarder) -> None:
    _log.info("tcp", downstream=_hostport(fwd.downstream_addr), orig_dst=_hostport(fwd.orig_dst),
              upstream=_hostport(fwd.upstream_addr),
              flags=fwd.flags or "-", detail=fwd.detail or "-", received=fwd.bytes_received,
              sent=fwd.bytes_sent, connect_ms=round((fwd.connect_time or 0) * 1000, 3),
              duration_ms=round(fwd.duration * 1000, 3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.proxy.l4harness", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--upstream", help="HOST:PORT to forward to")
    p.add_argument("--transparent", action="store_true", help="forward to SO_ORIGINAL_DST instead")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--log-connections", action="store_true", help="one log line per closed connection")
    args = p.parse_args(argv)
    if args.transparent == bool(args.upstream):
        p.error("give exactly one of --upstream and --transparent")
    configure("INFO")
    host, port = sockets.parse_hostport(args.listen)
    upstream = None if args.transparent else sockets.parse_hostport(args.upstream)
    reactor = Reactor()
    sock = sockets.listener(host, port)
    L4Listener(reactor, sock, lambda orig, _port: orig if upstream is None else upstream,
               transparent=args.transparent, connect_timeout=args.connect_timeout,
               on_close=_log_connection if args.log_connections else None)
    print(f"listening {host}:{sock.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: reactor.stop())
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
