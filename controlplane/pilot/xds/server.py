"""Pilot's I/O shell: galley in, per-group proxy config out, ACK/NACK and registrations back.

- A Subscriber to galley's `galley/` keys feeds the config resources.
- An RpcServer takes `register` / `heartbeat` / `deregister` (workloads, from node agents
  or proxies), `ack` / `nack` (from proxies), and `status` / `config` (for meshctl).
  A registration is filed under the caller's CURVE identity; only its owners (that identity,
  and the node agent a self-registering proxy names) may replace, renew or remove it: anyone
  else gets the error `not_owner` (counted in zmesh_bus_rpc_refused_total, logged).
- A Publisher carries the config as parts (meshapi/parts.py): each shared (outbound)
  set once under `cfg/o/<scope>/`, each config group's own parts and manifest under
  `cfg/g/<group>/` (see meshapi/groups.py).

Every change goes through the Debouncer; a push translates each group once and publishes
only the parts whose content changed, then the manifests that make them a version.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from bus.logs import Log
from bus.loop import Loop
from bus.pubsub import Publisher, Subscriber
from bus.rpc import Refused, Request, RpcServer
from controlplane.config.model import Resource
from controlplane.debounce import DebouncedCall, Debouncer
from controlplane.pilot.model import Proxy
from controlplane.pilot.networking import ProxyParts, build_proxy_parts
from controlplane.pilot.networking.push_context import PushContext
from controlplane.pilot.serviceregistry.aggregate import REGISTRY_KINDS, ServiceRegistry
from controlplane.pilot.xds.metrics import GROUP_PUBLISHES, PARTS_PUBLISHED, PROXIES, PUSH_SECONDS, PUSHES
from controlplane.pilot.xds.status import StatusTracker
from meshapi import groups
from meshapi.parts import MANIFEST, SHARED_PREFIX, PartSet, pack

# Kinds that only shape what a proxy sends (its outbound side): an edit of these alone leaves
# every group's own parts (inbound listeners, security) as they were.
OUTBOUND_KINDS = frozenset({"VirtualService", "DestinationRule", "Gateway"})
_HISTORY = 256  # config versions kept for `meshctl proxy-config` (what proxies say they run)
Entry = tuple[str, "bytes | None", str]  # (key, encoded body or None to delete, config version)
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
                 stale_after: float = 5.0, lease: float = LEASE_SECONDS,
                 citadel_name: str = "citadel", mesh_config: dict[str, Any] | None = None) -> None:
        self.loop = loop
        self.mesh_config = mesh_config or {}  # Istio's MeshConfig fields (see meshconfig.py)
        self.publisher = publisher
        self.debounce = debounce or Debouncer()
        self.lease = lease
        self.citadel_name = citadel_name
        self.registry = ServiceRegistry()
        self.status = StatusTracker(stale_after)
        self.log = Log("pilot")
        self.resources: dict[str, Resource] = {}
        self.group_versions: dict[str, str] = {}      # group -> version published
        self.published: dict[str, ProxyParts] = {}    # group -> parts published
        self.scopes: dict[str, PartSet] = {}          # scope -> shared set published
        self.history: OrderedDict[str, ProxyParts] = OrderedDict()  # version -> parts
        self.pushes = 0
        self._push_call = DebouncedCall(loop, self.debounce, self.push)
        self._registry_dirty = False
        self._local_dirty = True  # anything but an outbound-only edit: rebuild groups' own parts
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
            old = self.resources.pop(key, None)
            kind = old.kind if old else ""
        else:
            try:
                self.resources[key] = resource_from_galley(value)
            except (KeyError, TypeError):
                self.log.warning("ignoring malformed galley entry", key=key)
                return
            kind = self.resources[key].kind
        self._registry_dirty = self._registry_dirty or kind in REGISTRY_KINDS
        self._changed(local=kind not in OUTBOUND_KINDS)

    def on_galley_synced(self, _subscriber: Any = None) -> None:
        if not self.galley_synced:
            self.galley_synced = True
            self.log.info("galley snapshot complete", resources=len(self.resources))
            self._changed()

    def rpc_handlers(self) -> dict[str, Any]:
        return {"register": self._register, "heartbeat": self._heartbeat, "deregister": self._deregister,
                "ack": self._ack, "nack": self._nack, "status": self._status, "config": self._config,
                "workloads": self._workloads}

    def _owned(self, req: Request, ids: Any) -> None:
        """Refuse `req` unless its caller may change every registration in `ids`. Over ipc:// there
        is no CURVE identity: the socket file's mode is the access check."""
        regs = self.registry.registrations
        foreign = sorted(str(i) for i in ids if req.peer and not regs.may_change(str(i), req.peer))
        if foreign:
            raise Refused("not_owner", f"{req.peer} does not own the registration of {', '.join(foreign)}")

    def _register(self, req: Request) -> dict[str, Any]:
        body = req.body or {}
        now = time.monotonic()
        workload = {"id": str(body["id"]), "namespace": str(body.get("namespace", "default")),
                    "ip": str(body.get("ip", "")), "labels": dict(body.get("labels") or {}),
                    "service_account": str(body.get("service_account", "default")),
                    "ports": dict(body.get("ports") or {})}
        self._owned(req, [workload["id"]])
        # the node is the caller's CURVE identity, which it cannot forge; the body's only on ipc://
        node = str(req.peer or body.get("node") or workload["id"])
        agent = str(body.get("node") or "") if req.peer else ""  # a proxy's own node agent
        self.registry.registrations.register(workload, node, now, self.lease, agent)
        self.status.known(workload["id"], now)
        if body.get("version"):  # what it already runs (after a pilot restart), as xDS version_info
            self.status.ack(workload["id"], str(body["version"]), now)
        self._changed()
        proxy = self.registry.registrations.proxy(workload["id"])
        group = proxy.group if proxy else ""
        return {"group": group, "topic": groups.topic(group), "lease": self.lease,
                "version": self.group_versions.get(group, "")}

    def _heartbeat(self, req: Request) -> dict[str, Any]:
        node = str(req.peer or (req.body or {}).get("node"))
        ids = [str(i) for i in (req.body or {}).get("ids") or ()]
        self._owned(req, ids)
        now = time.monotonic()
        regs = self.registry.registrations
        renewed = regs.heartbeat(node, now, ids)
        for wid in {*regs.of_node(node), *ids}:  # contact, as proxy-status shows it
            if regs.proxy(wid) is not None:
                self.status.known(wid, now)
        # `missing`: those of the caller's `ids` pilot does not hold (it restarted): register them again
        missing = [i for i in ids if regs.proxy(i) is None]
        return {"lease": self.lease, "renewed": renewed, "missing": missing}

    def _deregister(self, req: Request) -> dict[str, Any]:
        proxy_id = str((req.body or {})["id"])
        self._owned(req, [proxy_id])
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

    def _workloads(self, req: Request) -> list[dict[str, str]]:
        """For citadel's node authorization: the identities registered on one node (citadel only:
        a node agent must not learn what runs elsewhere)."""
        if req.peer != self.citadel_name:
            raise Refused("not_citadel",
                          f"workloads is answered to {self.citadel_name} only, not {req.peer!r}")
        regs = self.registry.registrations
        proxies = [regs.proxy(wid) for wid in regs.of_node(str((req.body or {})["node"]))]
        pairs = sorted({(p.namespace, p.service_account) for p in proxies if p is not None})
        return [{"namespace": ns, "service_account": sa} for ns, sa in pairs]

    def _status(self, req: Request) -> list[dict[str, Any]]:
        return self.status.rows(time.monotonic())

    def _config(self, req: Request) -> dict[str, Any]:
        """The config a proxy last reported applying (ACK, or in force after a NACK)."""
        proxy_id = str((req.body or {})["proxy"])
        rec = self.status.records.get(proxy_id)
        if rec is None:
            raise KeyError(f"unknown proxy {proxy_id!r}")
        version = rec.in_force or rec.acked
        parts = self.history.get(version)
        return {"proxy": proxy_id, "version": version, "sent": rec.sent,
                "config": parts.config() if parts else None, "known": parts is not None}

    # -- pushes --
    def _expire_leases(self) -> None:
        expired = self.registry.registrations.expire(time.monotonic())
        for proxy_id in expired:
            self.status.forget(proxy_id)
            self.log.info("lease expired; workload removed", proxy=proxy_id)
        if expired:
            self._changed()

    def set_mesh_config(self, mesh_config: dict[str, Any]) -> None:
        """A new MeshConfig: it can change any part of any proxy's config, so everything is rebuilt."""
        if mesh_config != self.mesh_config:
            self.mesh_config = mesh_config
            self.log.info("mesh config changed", fields=",".join(sorted(mesh_config)) or "-")
            self._changed(local=True)

    def _changed(self, local: bool = True) -> None:
        """Something changed; `local=False`: nothing a group's own parts depend on."""
        self._local_dirty = self._local_dirty or local
        self._push_call.change()

    def push(self) -> None:
        """Start a push: translate each config group once (in a worker thread, so registrations
        and ACKs are still answered during a long one) and publish what changed."""
        if not self.galley_synced:
            return  # a partial config would be pushed, then pushed again: wait for the sync
        if self._pushing:
            self._push_again = True  # the running push may have missed this change
            return
        merged = self.debounce.fire()
        if self._registry_dirty:  # a VirtualService edit need not rebuild the registry
            self.registry.update_config(list(self.resources.values()))
            self._registry_dirty = False
        reuse_local = not self._local_dirty
        self._local_dirty = False
        inputs = (self.registry.services(), self.registry.all_endpoints(), list(self.resources.values()),
                  self.mesh_config, self.registry.registrations.proxies(), dict(self.published),
                  dict(self.scopes), reuse_local)
        self._pushing = True
        threading.Thread(target=self._translate, args=(merged, *inputs), name="pilot-push",
                         daemon=True).start()

    def _translate(self, merged: int, services: list, endpoints: list, resources: list[Resource],
                   mesh_config: dict[str, Any], proxies: list[Proxy], published: dict[str, ProxyParts],
                   scopes: dict[str, PartSet], reuse_local: bool) -> None:
        started = time.perf_counter()
        members: dict[str, list[Proxy]] = {}
        for proxy in proxies:
            members.setdefault(proxy.group, []).append(proxy)
        built: dict[str, ProxyParts] = {}
        entries: list[Entry] = []
        try:
            push = PushContext(services, endpoints, resources, mesh_config)
            new_scopes: dict[str, PartSet] = {}
            for group, group_proxies in sorted(members.items()):
                old = published.get(group)
                parts = built[group] = build_proxy_parts(
                    push, group_proxies[0], scopes, old.local if reuse_local and old else None)
                if parts.scope not in new_scopes:
                    new_scopes[parts.scope] = parts.shared
                    entries += _changes(SHARED_PREFIX + parts.scope + "/", parts.shared,
                                        scopes.get(parts.scope), {})
            for group, parts in built.items():  # the group manifests last: they name the scopes' versions
                old = published.get(group)
                if old is None or old.version != parts.version:
                    manifest = {"scope": parts.scope, "scope_version": parts.shared.version,
                                "version": parts.version}
                    entries += _changes(groups.topic(group), parts.local, old and old.local, manifest)
            for scope in set(scopes) - set(new_scopes):
                entries += _removal(SHARED_PREFIX + scope + "/", scopes[scope])
            for group in set(published) - set(members):
                entries += _removal(groups.topic(group), published[group].local)
        except Exception:
            self.log.error("push failed", exc_info=True)
            built, new_scopes, entries = {}, scopes, []
        if entries:  # encoded here, signed and sent by the loop, all in one turn
            self.publisher.set_many(entries)
        elapsed = time.perf_counter() - started
        self.loop.call_soon_threadsafe(
            lambda: self._pushed(merged, built, new_scopes, members, len(entries), elapsed))

    def _pushed(self, merged: int, built: dict[str, ProxyParts], scopes: dict[str, PartSet],
                members: dict[str, list[Proxy]], entries: int, elapsed: float) -> None:
        """Back in the loop: record what was sent to whom."""
        now = time.monotonic()
        changed = 0
        for group, parts in built.items():
            if self.group_versions.get(group) != parts.version:
                changed += 1
                self.history[parts.version] = parts
                self.history.move_to_end(parts.version)
                while len(self.history) > _HISTORY:
                    self.history.popitem(last=False)
            self.group_versions[group] = parts.version
            for proxy in members[group]:
                self.status.sent(proxy.id, parts.version, now)
        if built or not members:
            self.published = built
            self.scopes = scopes
            for group in set(self.group_versions) - set(built):
                del self.group_versions[group]
        self.pushes += 1
        PUSHES.inc()
        PUSH_SECONDS.observe(elapsed)
        PROXIES.set(sum(len(m) for m in members.values()))
        GROUP_PUBLISHES.inc(changed)
        PARTS_PUBLISHED.inc(entries)
        self.log.info("push", changes=merged, proxies=sum(len(m) for m in members.values()),
                      groups=len(members), changed=changed, keys=entries, ms=round(elapsed * 1000, 1))
        self._pushing = False
        if self._push_again:
            self._push_again = False
            self._changed()


def _changes(prefix: str, new: PartSet, old: PartSet | None, manifest: dict[str, Any]) -> list[Entry]:
    """The keys that turn `old` into `new` under `prefix`, then the set's manifest."""
    changed, removed = new.changes(old)
    if not changed and not removed and not manifest:
        return []
    out: list[Entry] = [(prefix + s, new.packed[s], new.version) for s in changed]
    out += [(prefix + s, None, new.version) for s in removed]
    body = {**manifest, "parts": len(new.values)}
    body.setdefault("version", new.version)
    out.append((prefix + MANIFEST, pack(body), body["version"]))
    return out


def _removal(prefix: str, old: PartSet) -> list[Entry]:
    return [(prefix + MANIFEST, None, "")] + [(prefix + s, None, "") for s in old.values]


def subscribe_galley(loop: Loop, pilot: Pilot, **subscriber_kw: Any) -> Subscriber:
    return Subscriber(loop, prefix="galley/", on_change=pilot.on_galley, on_sync=pilot.on_galley_synced,
                      name="pilot-galley", **subscriber_kw)


def serve_rpc(loop: Loop, pilot: Pilot, endpoint: str, keyring: Any) -> RpcServer:
    return RpcServer(loop, endpoint, keyring, pilot.rpc_handlers(), name="pilot")
