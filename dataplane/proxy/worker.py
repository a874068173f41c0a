"""One proxy worker process: a reactor, the listeners, and the control channel to its supervisor.

Workers share the listening ports with SO_REUSEPORT, so the kernel spreads connections
over them; each applies every config it is sent on its own (compiling it, keeping its
clusters' outlier state across the swap) and answers whether it could.

With `certs` (the node agent's certificate directory) the worker speaks Istio mutual TLS: its tick
checks the directory's `version` once a second and swaps in new SSLContexts when it changed (new
connections use them, open ones carry on with theirs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from bus.logs import Log
from dataplane.proxy import accesslog, memory, sockets
from dataplane.proxy.connlimit import ConnectionLimit, default_limit
from dataplane.proxy.control import FrameError, FrameReader, frame
from dataplane.proxy.listeners import SidecarListener
from dataplane.proxy.reactor import EPOLLIN, Reactor
from dataplane.proxy.runtime import ConfigError, Runtime
from dataplane.proxy.stats import Stats, Workload
from dataplane.proxy.tls import WorkloadCerts
from meshapi import ports

TICK = 1.0  # outlier un-ejection, access-log flush
LOCALHOST = "127.0.0.1"  # where pilot's inbound clusters send: the app beside the proxy


@dataclass
class WorkerOptions:
    node_id: str
    workload: Workload
    mode: str = "transparent"            # or "explicit"
    outbound_port: int = ports.OUTBOUND
    inbound_port: int = ports.INBOUND
    bind: str = "0.0.0.0"
    explicit_host: str = "127.0.0.1"    # explicit mode: the outbound listeners (where the app sends)
    inbound_host: str | None = None      # explicit mode: the inbound listener (peers); None: explicit_host
    app_host: str = "127.0.0.1"          # where inbound traffic reaches the app
    access_log: bool = True
    mark: int = 0
    certs: str | None = None             # the workload's certificate directory: mutual TLS
    max_connections: int = 0             # downstream connections per worker; 0: connlimit.default_limit()
    splice: bool = True                  # False: L4 bytes always go through userspace (benchmarks)
    reserved: tuple[tuple[str, int], ...] = ()  # the supervisor's admin and stats addresses (never upstreams)


def _http_factory() -> Any:
    from dataplane.proxy.http.server import HttpConnection
    return HttpConnection


def _http_upstreams(runtime: Runtime) -> Any:
    from dataplane.proxy.http.state import http_state
    return http_state(runtime).upstreams


class Worker:
    def __init__(self, index: int, ctrl: socket.socket, opts: WorkerOptions) -> None:
        self.index = index
        self.ctrl = ctrl
        self.opts = opts
        self.log = Log("proxy.worker", proxy=opts.node_id, worker=index)
        self.reactor = Reactor()
        self.certs = WorkloadCerts(opts.certs, log=self.log) if opts.certs else None
        workload = opts.workload
        if self.certs is not None and self.certs.maybe_reload():
            workload = dataclasses.replace(workload, principal=self.certs.principal)
        self.runtime = Runtime(self.reactor, Stats(workload), accesslog.create(opts.access_log),
                               opts.node_id)
        self.runtime.limit = ConnectionLimit(opts.max_connections or default_limit(), self.runtime.stats)
        for host, port in opts.reserved:
            self.runtime.own.add(host, port)
        self.http = _http_factory()
        upstreams = _http_upstreams(self.runtime)
        upstreams.certs = self.certs
        upstreams.own = self.runtime.own
        self.listeners: dict[Any, SidecarListener] = {}
        self._own: dict[Any, tuple[str, int]] = {}  # listener key -> its address, when it is one of ours
        self._reader = FrameReader()
        ctrl.setblocking(False)
        self.reactor.register(ctrl.fileno(), EPOLLIN, self._on_ctrl)
        self._tick()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.reactor.stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        self.reactor.run()
        self.runtime.access_log.flush()

    def _listen(self, key: Any, host: str, port: int, direction: str, explicit_port: int | None) -> None:
        try:
            sock = sockets.listener(host, port)
        except OSError as exc:
            self.log.error("cannot listen", address=f"{host}:{port}", error=str(exc))
            return
        self.listeners[key] = SidecarListener(self.runtime, sock, direction, explicit_port=explicit_port,
                                              http_factory=self.http, mark=self.opts.mark, certs=self.certs,
                                              app_host=self.opts.app_host, splice=self.opts.splice)
        if key[0] != "in" or explicit_port is None:  # explicit inbound stands for the app (blackhole.py)
            self._own[key] = sock.getsockname()[:2]
            self.runtime.own.add(*self._own[key])

    def _close(self, key: Any) -> None:
        self.listeners.pop(key).close()
        if key in self._own:
            self.runtime.own.discard(*self._own.pop(key))

    def _listen_transparent(self) -> None:
        """15001 and 15006, once the first config is in force (as Envoy's listeners come with LDS):
        a proxy starting beside a running one (SO_REUSEPORT) must not take connections it can
        only pass through blind, and before any config there is nothing else to do with them."""
        self._listen(("out",), self.opts.bind, self.opts.outbound_port, "outbound", None)
        self._listen(("in",), self.opts.bind, self.opts.inbound_port, "inbound", None)

    def _sync_explicit(self) -> None:
        """Explicit mode: one loopback listener per outbound service port in the config, and,
        when the workload serves exactly one port, the inbound port standing for it (a peer
        sidecar in explicit mode sends there; without iptables nothing else tells the port)."""
        snapshot = self.runtime.snapshot
        wanted: set[Any] = {("port", port) for port in snapshot.outbound}
        if len(snapshot.inbound) == 1:
            wanted.add(("in", next(iter(snapshot.inbound))))
        for key in set(self.listeners) - wanted:
            self._close(key)
        for key in sorted(wanted - set(self.listeners)):
            if key[0] == "in":
                host = self.opts.inbound_host or self.opts.explicit_host
                self._listen(key, host, self.opts.inbound_port, "inbound", key[1])
            else:
                self._listen(key, self.opts.explicit_host, key[1], "outbound", key[1])

    def _tick(self) -> None:
        now_ms = self.reactor.now * 1000
        for cluster in self.runtime.snapshot.clusters.values():
            cluster.tick(now_ms)
        self.runtime.access_log.tick(self.reactor.now)
        memory.release()
        self._load_certs()
        self.reactor.call_later(TICK, self._tick)

    def _load_certs(self) -> bool:
        """Take the node agent's newest certificates if it wrote new ones; whether this worker can
        speak mutual TLS (True without --certs: it has nothing to wait for)."""
        certs = self.certs
        if certs is None:
            return True
        if certs.maybe_reload():
            stats = self.runtime.stats
            if stats.local.principal != certs.principal:
                stats.local = dataclasses.replace(stats.local, principal=certs.principal)
        return certs.client is not None

    # control -------------------------------------------------------------------------------
    def _on_ctrl(self, _mask: int) -> None:
        while True:
            try:
                data = self.ctrl.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the supervisor is gone: so are we
                self.reactor.stop()
                return
            try:
                messages = self._reader.feed(data)
            except FrameError as exc:
                self.log.error("bad control frame", error=str(exc))
                self.reactor.stop()
                return
            for message in messages:
                self._reply(self._handle(message))

    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "config":
            config = message.get("config") or {}
            version = str(config.get("version", ""))
            if self.opts.app_host != LOCALHOST:
                config = app_on(config, self.opts.app_host)
            try:
                self.runtime.apply(config)
            except ConfigError as exc:
                return {"op": "rejected", "version": version, "error": str(exc)}
            if self.opts.mode == "explicit":
                self._sync_explicit()
            elif not self.listeners and not self.runtime.draining:
                self._listen_transparent()
            return {"op": "applied", "version": version}
        if op == "certs":  # asked by /ready: load what is on disk now, not at the next tick
            return {"op": "certs", "loaded": self._load_certs()}
        if op == "stats":
            return {"op": "stats", "snapshot": self.runtime.stats.snapshot()}
        if op == "clusters":
            return {"op": "clusters", "clusters": {name: c.state() for name, c in
                                                   self.runtime.snapshot.clusters.items()}}
        if op == "memory":
            return {"op": "memory", "usage": {**memory.usage(), "worker": self.index}}
        if op == "drain":
            self.runtime.draining = True
            for key in list(self.listeners):
                self._close(key)
            return {"op": "draining"}
        return {"op": "error", "error": f"unknown op {op!r}"}

    def _reply(self, message: dict[str, Any]) -> None:
        data = frame(message)
        self.ctrl.setblocking(True)  # replies are small and the supervisor waits for them
        try:
            self.ctrl.sendall(data)
        except OSError:
            self.reactor.stop()
        finally:
            with contextlib.suppress(OSError):
                self.ctrl.setblocking(False)


def app_on(config: dict[str, Any], host: str) -> dict[str, Any]:
    """`config` with its inbound clusters' endpoints (pilot's 127.0.0.1) moved to `host`: several
    loopback pods cannot all have their app on 127.0.0.1:<port>, so each gets an address of its own."""
    clusters, endpoints = config.get("clusters") or {}, config.get("endpoints") or {}
    moved = {name: [{**ep, "address": host} if ep.get("address") == LOCALHOST else ep
                    for ep in endpoints[name]]
             for name, spec in clusters.items() if spec.get("direction") == "inbound" and name in endpoints}
    return {**config, "endpoints": {**endpoints, **moved}} if moved else config


def run_worker(index: int, ctrl: socket.socket, opts: WorkerOptions) -> None:
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        Worker(index, ctrl, opts).run()
    except Exception:
        Log("proxy.worker", proxy=opts.node_id, worker=index).error("worker crashed", exc_info=True)
        code = 1
    finally:
        os._exit(code)
