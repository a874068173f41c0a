"""The proxy's side of pilot's config protocol: follow a config group, hand over whole configs.

Pilot publishes a group's own parts and manifest under `cfg/g/<group>/`, and the outbound
parts the group shares with others under `cfg/o/<scope>/` (meshapi.parts).
A follower subscribes to the group, reads from its manifest which scope to follow, and calls
`on_update` exactly once per version, when it holds a whole, consistent set of parts. The
update names the parts that changed; the whole config is assembled only if asked for. A
set that is complete but does not fit together raises ValueError from `config()`, for the
proxy to NACK.

After a re-sync (a restarted pilot publishes the same content, so the same version) the
version is not applied again, but `on_resync(version)` lets the proxy repeat its answer: the
new pilot knows nothing of what its proxies run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bus.keys import Keyring
from bus.logs import Log
from bus.loop import Loop, Timer
from bus.pubsub import Subscriber
from bus.rpc import AsyncRpcClient
from bus.signing import Verifier
from meshapi.config import ProxyConfig
from meshapi.parts import MANIFEST, SHARED_PREFIX, Assembler


@dataclass
class ConfigUpdate:
    version: str
    touched: set[str]   # part suffixes changed since the last update; shared ones as "o:<suffix>"
    assembler: Assembler
    _config: ProxyConfig | None = field(default=None, repr=False)

    def config(self) -> ProxyConfig:
        """The whole config of this version (raises ValueError when its parts do not fit)."""
        if self._config is None:
            if (self.assembler.local_manifest or {}).get("version") != self.version:
                raise ValueError(f"version {self.version} is superseded; ask during on_update")
            self._config = self.assembler.config()
            if self._config is None:
                raise ValueError("config parts are incomplete")
        return self._config


class ConfigFollower:
    def __init__(self, loop: Loop, *, pub_endpoint: str, snapshot_endpoint: str, topic: str,
                 keyring: Keyring | None, server: str, verifier: Verifier,
                 on_update: Callable[[ConfigUpdate], None], name: str = "proxy",
                 silence_timeout: float = 3.0, on_resync: Callable[[str], None] | None = None) -> None:
        """Call from the loop thread (or through `loop.call_sync`)."""
        self.loop = loop
        self.topic = topic
        self.assembler = Assembler()
        self.scope = ""
        self.last_version = ""
        self.log = Log("xds", proxy=name)
        self._on_update = on_update
        self._on_resync = on_resync
        self._resynced = False  # since the last answer: a snapshot, or our manifest went away
        self._sub_kw: dict[str, Any] = {
            "pub_endpoint": pub_endpoint, "snapshot_endpoint": snapshot_endpoint, "keyring": keyring,
            "server": server, "verifier": verifier, "silence_timeout": silence_timeout,
            "on_sync": self._synced}
        self._name = name
        self.group = Subscriber(loop, prefix=topic, on_change=self._group_change, name=name, **self._sub_kw)
        self.shared: Subscriber | None = None

    def close(self) -> None:
        for sub in (self.group, self.shared):
            if sub is not None:
                sub.close()

    def _group_change(self, key: str, value: Any) -> None:
        suffix = key[len(self.topic):]
        self.assembler.local_change(suffix, value)
        if suffix == MANIFEST and value is None:
            self._resynced = True
        if suffix == MANIFEST:
            self._follow_scope()
            if self.group.incremental:
                self._try()

    def _shared_change(self, key: str, value: Any) -> None:
        suffix = key[len(SHARED_PREFIX) + len(self.scope) + 1:]
        self.assembler.shared_change(suffix, value)
        if suffix == MANIFEST and self.shared is not None and self.shared.incremental:
            self._try()

    def _follow_scope(self) -> None:
        scope = self.assembler.scope
        if not scope or scope == self.scope:
            return
        if self.shared is not None:
            self.shared.close()
        self.assembler.reset_shared()
        self.scope = scope
        self.log.debug("following scope", scope=scope)
        self.shared = Subscriber(self.loop, prefix=f"{SHARED_PREFIX}{scope}/", on_change=self._shared_change,
                                 name=f"{self._name}-shared", **self._sub_kw)

    def _synced(self, _sub: Subscriber) -> None:
        self._resynced = True
        self._try()

    def _try(self) -> None:
        manifest = self.assembler.local_manifest or {}
        version = str(manifest.get("version", ""))
        if not version or self.assembler.pending() is not None:
            return
        if version == self.last_version:
            if self._resynced and self._on_resync is not None:
                self._resynced = False
                self._on_resync(version)
            return
        self._resynced = False
        self.last_version = version
        self._on_update(ConfigUpdate(version, self.assembler.take_touched(), self.assembler))


def keep_registered(loop: Loop, rpc: AsyncRpcClient, node: str, proxy_id: str,
                    registration: Callable[[], dict[str, Any]], interval: float,
                    on_done: Callable[[Any, Exception | None], None] | None = None) -> Timer:
    """Renew our lease every `interval` (call from the loop thread). A pilot that no longer knows
    `proxy_id` (it restarted, or the lease ran out) gets `registration()` again: the body as it is
    now, with the version in force, so pilot knows at once what we run."""
    def renewed(reply: Any, error: Exception | None) -> None:
        if error is None and proxy_id in (reply or {}).get("missing", ()):
            rpc.call("register", registration(), on_done or _ignore)

    body = {"node": node, "ids": [proxy_id]}
    return loop.call_every(interval, lambda: rpc.call("heartbeat", body, renewed))


def _ignore(_reply: Any, _error: Exception | None) -> None:
    """A register that fails is retried by the next heartbeat."""
