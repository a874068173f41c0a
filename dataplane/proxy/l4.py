"""TCP listeners of the sidecar: accept, pick an upstream, hand the pair to a Forwarder.

Transparent mode (the 15001 outbound and 15006 inbound listeners): iptables REDIRECTed the
connection here, and `choose_upstream` gets the address the client dialled, read from
SO_ORIGINAL_DST. Explicit mode (a loopback listener per service port): it gets None and
decides from the listener port alone.

Run on its own as an explicit L4 proxy (what benchmarks/proxy_l4.py measures):

    python -m dataplane.proxy.l4 --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--workers N]

With `--workers N` it forks N processes that each bind the port with SO_REUSEPORT and run
their own reactor; `--transparent` forwards every connection to its original destination.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
# ("UH" by default) when there is no healthy upstream or no route for it
Chooser = Callable[[Address | None, int], Address | str | None]


_log = Log("l4")


class L4Listener:
    """Accepts on `sock` (from `sockets.listener`) and forwards each connection it can route."""

    def __init__(self, reactor: Reactor, sock: socket.socket, choose_upstream: Chooser, *,
                 transparent: bool = False, connect_timeout: float = 10.0, idle_timeout: float = 3600.0,
                 on_close: Callable[[Forwarder], Any] | None = None, mark: int = 0,
                 splice: bool = True) -> None:
        self.reactor = reactor
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.choose_upstream = choose_upstream
        self.transparent = transparent
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.mark = mark
        self.splice = splice
        self.connections: set[Forwarder] = set()
        self.acceptor = Acceptor(reactor, sock, self._serve)

    def close(self) -> None:
        """Stop accepting; connections in flight carry on."""
        self.acceptor.close()

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        orig = sockets.original_dst(sock) if self.transparent else None
        fwd = Forwarder(self.reactor, sock, on_close=self._closed, idle_timeout=self.idle_timeout,
                        mark=self.mark, splice=self.splice, downstream_addr=addr[:2], orig_dst=orig)
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


def _serve_forever(args: argparse.Namespace, ready_fd: int | None) -> None:
    host, port = sockets.parse_hostport(args.listen)
    upstream = None if args.transparent else sockets.parse_hostport(args.upstream)
    reactor = Reactor()
    sock = sockets.listener(host, port)
    L4Listener(reactor, sock, lambda orig, _port: orig if upstream is None else upstream,
               transparent=args.transparent, connect_timeout=args.connect_timeout,
               idle_timeout=args.idle_timeout, mark=args.mark, splice=not args.no_splice,
               on_close=_log_connection if args.log_connections else None)
    if ready_fd is None:
        print(f"listening {host}:{sock.getsockname()[1]} workers=1", flush=True)
    else:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: reactor.stop())
    reactor.run()


def _supervise(args: argparse.Namespace) -> int:
    """Fork the workers, report ready once all have bound, stop them all when one dies or on SIGTERM."""
    r, w = os.pipe()
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                _serve_forever(args, w)
            except BaseException:
                _log.error("worker failed", exc_info=True)
                code = 1
            os._exit(code)
        children.append(pid)
    os.close(w)
    bound = 0
    while bound < args.workers and (chunk := os.read(r, args.workers)):
        bound += len(chunk)
    os.close(r)

    def stop(*_: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if bound == args.workers:
        print(f"listening {args.listen} workers={args.workers}", flush=True)
    else:
        stop()
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.remove(pid)
        code = code or os.waitstatus_to_exitcode(status)
        stop()
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dataplane.proxy.l4", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--upstream", help="HOST:PORT to forward to (explicit mode)")
    p.add_argument("--transparent", action="store_true", help="forward to SO_ORIGINAL_DST instead")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--idle-timeout", type=float, default=3600.0)
    p.add_argument("--mark", type=lambda s: int(s, 0), default=0, help="SO_MARK for upstream sockets")
    p.add_argument("--no-splice", action="store_true", help="copy through userspace only")
    p.add_argument("--log-connections", action="store_true", help="one log line per closed connection")
    args = p.parse_args(argv)
    if not args.transparent and not args.upstream:
        p.error("--upstream is required unless --transparent")
    if args.workers > 1 and sockets.parse_hostport(args.listen)[1] == 0:
        p.error("--workers > 1 needs a fixed port")
    configure("INFO")
    if args.workers <= 1:
        _serve_forever(args, None)
        return 0
    return _supervise(args)


if __name__ == "__main__":
    sys.exit(main())
