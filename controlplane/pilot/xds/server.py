"""Pilot's I/O shell: galley in, per-group proxy config out, ACK/NACK and registrations back.

- A Subscriber to galley's `galley/` keys feeds the config resources.
- An RpcServer takes `register` / `heartbeat` / `deregister` (workloads, from node agents
  or proxies), `ack` / `nack` (from proxies), and `status` / `config` (for meshctl).
- A Publisher carries `cfg/g/<group>`: one signed key per config group (see groups.py).

Every change goes through the Debouncer; a push translates each group once and
publishes only the groups whose version (a content hash) changed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from bus.logs import Log
from bus.loop import Loop
from bus.pubsub import Publisher, Subscriber
from bus.rpc import Request, RpcServer
from controlplane.config.model import Resource
from controlplane.debounce import DebouncedCall, Debouncer
from controlplane.pilot.model import Proxy
from controlplane.pilot.networking import build_proxy_config
from controlplane.pilot.networking.push_context import PushContext
from controlplane.pilot.serviceregistry import ServiceRegistry
from controlplane.pilot.xds import groups
from controlplane.pilot.xds.metrics import GROUP_PUBLISHES, PROXIES, PUSH_SECONDS, PUSHES
from controlplane.pilot.xds.status import StatusTracker

_HISTORY = 256  # config versions kept for `meshctl proxy-config` (what proxies say they run)
LEASE_SECONDS = 15.0


def resource_from_galley(value: dict[str, Any]) -> Resource:
    """Galley publishes the normalised form; pilot reads it back as a Resource."""
    group = value.get("group", "")
    return Resource(api_version=f"{group}/v1" if group else "v1", kind=value["kind"], name=value["name"],
                    namespace=value.get("namespace", ""), spec=value.get("spec") or {},
                    labels=value.get("labels") or {}, annotations=value.get("annotations") or {},
                    raw=value)


class Pilot:
    def __init__(self, loop: Loop, publisher: Publisher, debounce: Debouncer | None = None,
                 stale_after: float = 5.0, lease: float = LEASE_SECONDS) -> None:
        self.loop = loop
        self.publisher = publisher
        self.debounce = debounce or Debouncer()
        self.lease = lease
        self.registry = ServiceRegistry()
        self.status = StatusTracker(stale_after)
        self.log = Log("pilot")
        self.resources: dict[str, Resource] = {}
        self.group_versions: dict[str, str] = {}      # group -> version published
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()  # version -> config
        self.pushes = 0
        self._push_call = DebouncedCall(loop, self.debounce, self.push)
        self._config_dirty = False
        self._pushing = False
        self._push_again = False
        self.galley_synced = False  # no push before galley's whole snapshot is in (Istio's cache sync)
        loop.call_every(1.0, self._expire_leases)

    # -- inputs --
    def on_galley(self, key: str, value: Any) -> None:
        """A galley key changed (value None: deleted)."""
        if key == "galley/_status":
            return
        if value is None:
            self.resources.pop(key, None)
        else:
            try:
                self.resources[key] = resource_from_galley(value)
            except (KeyError, TypeError):
                self.log.warning("ignoring malformed galley entry", key=key)
                return
        self._config_dirty = True
        self._changed()

    def on_galley_synced(self, _subscriber: Any = None) -> None:
        if not self.galley_synced:
            self.galley_synced = True
            self.log.info("galley snapshot complete", resources=len(self.resources))
            self._changed()

    def rpc_handlers(self) -> dict[str, Any]:
        return {"register": self._register, "heartbeat": self._heartbeat, "deregister": self._deregister,
                "ack": self._ack, "nack": self._nack, "status": self._status, "config": self._config}

    def _register(self, req: Request) -> dict[str, Any]:
        body = req.body or {}
        now = time.monotonic()
        workload = {"id": str(body["id"]), "namespace": str(body.get("namespace", "default")),
                    "ip": str(body.get("ip", "")), "labels": dict(body.get("labels") or {}),
                    "service_account": str(body.get("service_account", "default")),
                    "ports": dict(body.get("ports") or {})}
        node = str(body.get("node") or req.peer or workload["id"])
        self.registry.registrations.register(workload, node, now, self.lease)
        self.status.known(workload["id"], now)
        if body.get("version"):  # what it already runs (after a pilot restart), as xDS version_info
            self.status.ack(workload["id"], str(body["version"]), now)
        self._changed()
        proxy = self._proxy(workload["id"])
        group = groups.group_of(proxy) if proxy else ""
        return {"group": group, "topic": groups.topic(group), "lease": self.lease,
                "version": self.group_versions.get(group, "")}

    def _heartbeat(self, req: Request) -> dict[str, Any]:
        node = str((req.body or {}).get("node") or req.peer)
        renewed = self.registry.registrations.heartbeat(node, time.monotonic())
        return {"lease": self.lease, "renewed": renewed}  # 0: register again (pilot restarted)

    def _deregister(self, req: Request) -> dict[str, Any]:
        proxy_id = str((req.body or {})["id"])
        self.registry.registrations.deregister(proxy_id)
        self.status.forget(proxy_id)
        self._changed()
        return {}

    def _ack(self, req: Request) -> dict[str, Any]:
        body = req.body or {}
        self.status.ack(str(body["proxy"]), str(body["version"]), time.monotonic())
        return {}

    def _nack(self, req: Request) -> dict[str, Any]:
        body = req.body or {}
        self.status.nack(str(body["proxy"]), str(body["version"]), str(body.get("error", "")),
                         str(body.get("in_force", "")), time.monotonic())
        self.log.warning("proxy rejected config", proxy=body.get("proxy"), version=body.get("version"),
                         error=body.get("error"))
        return {}

    def _status(self, req: Request) -> list[dict[str, Any]]:
        return self.status.rows(time.monotonic())

    def _config(self, req: Request) -> dict[str, Any]:
        """The config a proxy last reported applying (ACK, or in force after a NACK)."""
        proxy_id = str((req.body or {})["proxy"])
        rec = self.status.records.get(proxy_id)
        if rec is None:
            raise KeyError(f"unknown proxy {proxy_id!r}")
        version = rec.in_force or rec.acked
        config = self.history.get(version)
        return {"proxy": proxy_id, "version": version, "sent": rec.sent, "config": config,
                "known": config is not None}

    # -- pushes --
    def _expire_leases(self) -> None:
        expired = self.registry.registrations.expire(time.monotonic())
        for proxy_id in expired:
            self.status.forget(proxy_id)
            self.log.info("lease expired; workload removed", proxy=proxy_id)
        if expired:
            self._changed()

    def _changed(self) -> None:
        self._push_call.change()

    def _proxy(self, proxy_id: str) -> Proxy | None:
        return next((p for p in self.registry.registrations.proxies() if p.id == proxy_id), None)

    def push(self) -> None:
        """Start a push: translate each config group once (in a worker thread, so registrations
        and ACKs are still answered during a long one) and publish the groups whose version changed."""
        if not self.galley_synced:
            return  # a partial config would be pushed, then pushed again: wait for the sync
        if self._pushing:
            self._push_again = True  # the running push may have missed this change
            return
        merged = self.debounce.fire()
        if self._config_dirty:
            self.registry.update_config(list(self.resources.values()))
            self._config_dirty = False
        inputs = (self.registry.services(), self.registry.all_endpoints(), list(self.resources.values()),
                  self.registry.registrations.proxies(), dict(self.group_versions))
        self._pushing = True
        threading.Thread(target=self._translate, args=(merged, *inputs), name="pilot-push",
                         daemon=True).start()

    def _translate(self, merged: int, services: list, endpoints: list, resources: list[Resource],
                   proxies: list[Proxy], published_versions: dict[str, str]) -> None:
        started = time.perf_counter()
        members: dict[str, list[Proxy]] = {}
        for proxy in proxies:
            members.setdefault(groups.group_of(proxy), []).append(proxy)
        results: list[tuple[str, str, dict[str, Any] | None, list[Proxy]]] = []
        try:
            push = PushContext(services, endpoints, resources)
            for group, group_proxies in sorted(members.items()):
                config = build_proxy_config(push, group_proxies[0])
                version = config["version"]
                changed = published_versions.get(group) != version
                if changed:  # encoded here, signed and sent by the loop
                    self.publisher.set(groups.topic(group), config, config_version=version)
                results.append((group, version, config if changed else None, group_proxies))
        except Exception:
            self.log.error("push failed", exc_info=True)
        elapsed = time.perf_counter() - started
        self.loop.call_soon_threadsafe(lambda: self._pushed(merged, results, members, elapsed))

    def _pushed(self, merged: int, results: list, members: dict[str, list[Proxy]], elapsed: float) -> None:
        """Back in the loop: record what was sent to whom."""
        now = time.monotonic()
        published = 0
        for group, version, config, group_proxies in results:
            if config is not None:
                self.group_versions[group] = version
                self.history[version] = config
                self.history.move_to_end(version)
                while len(self.history) > _HISTORY:
                    self.history.popitem(last=False)
                published += 1
            for proxy in group_proxies:
                self.status.sent(proxy.id, version, now)
        for group in set(self.group_versions) - set(members):
            del self.group_versions[group]
            self.publisher.delete(groups.topic(group))
        self.pushes += 1
        PUSHES.inc()
        PUSH_SECONDS.observe(elapsed)
        PROXIES.set(sum(len(m) for m in members.values()))
        GROUP_PUBLISHES.inc(published)
        self.log.info("push", changes=merged, proxies=sum(len(m) for m in members.values()),
                      groups=len(members), published=published, ms=round(elapsed * 1000, 1))
        self._pushing = False
        if self._push_again:
            self._push_again = False
            self._changed()

def subscribe_galley(loop: Loop, pilot: Pilot, **subscriber_kw: Any) -> Subscriber:
    return Subscriber(loop, prefix="galley/", on_change=pilot.on_galley, on_sync=pilot.on_galley_synced,
                      name="pilot-galley", **subscriber_kw)


def serve_rpc(loop: Loop, pilot: Pilot, endpoint: str, keyring: Any) -> RpcServer:
    return RpcServer(loop, endpoint, keyring, pilot.rpc_handlers(), name="pilot")
