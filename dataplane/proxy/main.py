"""The sidecar process: workers, where config comes from, ACK/NACK, admin and metrics.

Config comes from pilot over the bus (directly, or through the node agent's relay) or,
standalone, from a file in pilot's schema (JSON or YAML; SIGHUP re-reads it). Each version
goes to every worker; when all applied it, the proxy ACKs it, and when any could not, it
NACKs with the reason and the version still in force (the workers that could not keep
their last good config, and a deterministic compile means they all agree).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bus.logs import Log
from dataplane.proxy.admin import AdminState, serve
from dataplane.proxy.supervisor import WorkerError, Workers
from dataplane.proxy.worker import WorkerOptions
from meshapi import ports

HEARTBEAT = 5.0  # seconds; pilot's lease is 15 s


@dataclass
class BusOptions:
    pub_endpoint: str
    snapshot_endpoint: str
    rpc_endpoint: str
    key_dir: str | None       # None: the endpoints are a local relay's ipc:// sockets
    name: str                 # our key name
    workload: dict[str, Any]  # namespace, labels, service_account (they name our config group), ip, ports
    server: str = "pilot"
    register: bool = False    # register and heartbeat ourselves (when no node agent does it for us)


class Sidecar:
    def __init__(self, opts: WorkerOptions, workers: int, admin_host: str = "127.0.0.1",
                 admin_port: int = ports.PROXY_ADMIN, stats_host: str = "0.0.0.0",
                 stats_port: int = ports.PROXY_METRICS) -> None:
        self.log = Log("proxy", proxy=opts.node_id)
        self.node_id = opts.node_id
        opts = dataclasses.replace(opts, reserved=((admin_host, admin_port), (stats_host, stats_port)))
        self.workers = Workers(workers, opts)  # before any thread: fork copies only this one
        self.state = AdminState(self.workers.request, opts.node_id)
        self.servers = [serve(self.state, admin_host, admin_port, admin=True),
                        serve(self.state, stats_host, stats_port, admin=False)]
        self._updates: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._done = threading.Event()
        self.on_result: Any = None  # (method, body) -> None: ACK/NACK to pilot, when on the bus
        self.last_result: tuple[str, dict[str, Any]] | None = None  # repeated after a re-sync
        self.log.info("proxy started", workers=workers, mode=opts.mode, admin=f"{admin_host}:{admin_port}",
                      stats=f"{stats_host}:{stats_port}")

    def apply(self, config: dict[str, Any]) -> str | None:
        """Send `config` to every worker; None when all applied it, else the reason (NACK text)."""
        version = str(config.get("version", ""))
        try:
            replies = self.workers.request({"op": "config", "config": config}, timeout=30)
        except WorkerError as exc:
            return str(exc)
        errors = sorted({r.get("error", r["op"]) for r in replies if r["op"] != "applied"})
        if errors:
            self.state.rejected = {"version": version, "error": "; ".join(errors), "at": time.time()}
            self.log.warning("config rejected", version=version, error="; ".join(errors),
                             in_force=self.state.version)
            return "; ".join(errors)
        self.state.version, self.state.config, self.state.applied_at = version, config, time.time()
        self.log.info("config applied", version=version)
        return None

    def submit(self, config: dict[str, Any]) -> None:
        """Queue a config (from any thread); the applier applies the newest one queued."""
        self._updates.put(config)

    def run(self, bus: BusOptions | None = None, config_file: Path | None = None) -> None:
        """Apply configs until SIGTERM/SIGINT (or a worker dies), then drain and stop."""
        signal.signal(signal.SIGTERM, lambda *_: self._done.set())
        signal.signal(signal.SIGINT, lambda *_: self._done.set())
        stop_bus = None
        if config_file is not None:
            signal.signal(signal.SIGHUP, lambda *_: self._load(config_file))
            self._load(config_file)
        if bus is not None:
            stop_bus = _follow_pilot(self, bus)
        threading.Thread(target=self._applier, name="applier", daemon=True).start()
        while not self._done.wait(0.5):
            if not self.workers.alive():
                self.log.error("a worker died; stopping so the agent restarts the proxy")
                break
        self._updates.put(None)
        if stop_bus is not None:
            stop_bus()
        for server in self.servers:
            server.shutdown()
        self.workers.stop()
        self.log.info("proxy stopped")

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
            config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            if not isinstance(config, dict):
                raise ValueError("the file must hold one mapping (pilot's proxy config)")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self.log.error("cannot read config file", path=str(path), error=str(exc))
            return
        self.submit(config)

    def _applier(self) -> None:
        while True:
            config = self._updates.get()
            while not self._updates.empty():  # only the newest matters
                newer = self._updates.get()
                if newer is None:
                    return
                config = newer
            if config is None:
                return
            in_force = self.state.version
            error = self.apply(config)
            if self.on_result is not None:
                version = str(config.get("version", ""))
                if error is None:
                    self.last_result = ("ack", {"proxy": self.node_id, "version": version})
                else:
                    self.last_result = ("nack", {"proxy": self.node_id, "version": version, "error": error,
                                                 "in_force": in_force})
                self.on_result(*self.last_result)

    def repeat_result(self, version: str) -> None:
        """Answer `version` again (a restarted pilot asks nobody what they run)."""
        if self.on_result is not None and self.last_result is not None \
                and self.last_result[1]["version"] == version:
            self.log.info("re-sync: repeating our answer", method=self.last_result[0], version=version)
            self.on_result(*self.last_result)


def _follow_pilot(sidecar: Sidecar, bus: BusOptions) -> Any:
    """Register (when asked), follow our group's config, ACK/NACK; returns a stop function."""
    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.rpc import AsyncRpcClient
    from bus.signing import Verifier
    from dataplane.xds import ConfigFollower, ConfigUpdate, keep_registered
    from meshapi import groups

    loop = Loop("proxy-bus").start()
    ring = Keyring(bus.key_dir, bus.name) if bus.key_dir else None
    if ring is None:
        raise ValueError("the proxy needs the mesh's key directory (CURVE keys and config signers)")
    rpc = loop.call_sync(lambda: AsyncRpcClient(loop, bus.rpc_endpoint, ring, bus.server, origin=bus.name))
    sidecar.on_result = lambda method, body: rpc.call(method, body, _log_failure(sidecar, method))
    node_id = sidecar.node_id
    workload = {**bus.workload, "id": node_id, "node": bus.workload.get("node", node_id)}

    def registration() -> dict[str, Any]:
        return {**workload, "version": sidecar.state.version}

    if bus.register:  # pilot may not be up yet: heartbeats register again until it is
        loop.call_sync(lambda: rpc.call("register", registration(), _log_failure(sidecar, "register")))
    topic = groups.topic(groups.group_id(workload.get("namespace", "default"), workload.get("labels") or {},
                                         workload.get("service_account", "default")))
    keyring = None if bus.pub_endpoint.startswith("ipc://") else ring

    def on_update(update: ConfigUpdate) -> None:
        try:
            sidecar.submit(update.config())
        except ValueError as exc:
            sidecar.on_result("nack", {"proxy": node_id, "version": update.version, "error": str(exc),
                                       "in_force": sidecar.state.version})

    follower = loop.call_sync(lambda: ConfigFollower(
        loop, pub_endpoint=bus.pub_endpoint, snapshot_endpoint=bus.snapshot_endpoint, topic=topic,
        keyring=keyring, server=bus.server, verifier=Verifier(ring.trusted_signers), on_update=on_update,
        name=node_id, on_resync=sidecar.repeat_result))
    timers = []
    if bus.register:
        registered = _log_failure(sidecar, "register")
        timers.append(loop.call_sync(lambda: keep_registered(
            loop, rpc, workload["node"], node_id, registration, HEARTBEAT, registered)))

    def stop() -> None:
        def close() -> None:
            for timer in timers:
                timer.cancel()
            follower.close()
            rpc.close()
        loop.call_sync(close)
        loop.stop()
    return stop


def _log_failure(sidecar: Sidecar, method: str) -> Any:
    def done(_result: Any, error: Exception | None) -> None:
        if error is not None:
            sidecar.log.warning("request to pilot failed", method=method, error=str(error))
    return done
