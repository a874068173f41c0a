"""A simulated sidecar: registers with pilot, follows its group's config, ACKs or NACKs.

It is a real bus client (CURVE RPC + the proxy's own ConfigFollower), used by tests and the
convergence benchmark; `reject` makes it NACK, as a proxy does with config it cannot apply.
`via_relay`: the config endpoints are a node relay's ipc:// sockets (no CURVE there).
`keep_config=False` (a fleet in one process) applies deltas and never assembles a whole config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bus.keys import Keyring
from bus.loop import Loop
from bus.rpc import AsyncRpcClient
from bus.signing import Verifier
from dataplane.xds import ConfigFollower, ConfigUpdate, keep_registered


class SimProxy:
    def __init__(self, loop: Loop, ring: Keyring, *, proxy_id: str, namespace: str, ip: str,
                 labels: dict[str, str], pilot_rpc: str, pilot_pub: str, pilot_snapshot: str,
                 service_account: str = "default", verifier: Verifier | None = None,
                 via_relay: bool = False, keep_config: bool = True, follow: bool = True,
                 reject: Callable[[dict[str, Any]], str | None] | None = None,
                 on_apply: Callable[[str], None] | None = None) -> None:
        self.id = proxy_id
        self.applied = ""
        self.rejected: list[str] = []
        self.applies = 0
        self.reject = reject
        self.on_apply = on_apply
        self.keep_config = keep_config
        self.applied_config: dict[str, Any] | None = None
        self._heartbeats: Any = None
        self.loop = loop
        self._rpc = loop.call_sync(lambda: AsyncRpcClient(loop, pilot_rpc, ring, "pilot", origin=ring.name,
                                                          timeout=2, retries=3), timeout=60)
        self.workload = {"id": proxy_id, "namespace": namespace, "ip": ip, "labels": labels,
                         "service_account": service_account, "node": proxy_id}
        reply = self._rpc.call_wait("register", self.workload, timeout=60)
        self.group = reply["group"]
        self._follow_args = (pilot_pub, pilot_snapshot, reply["topic"], None if via_relay else ring,
                             verifier or Verifier(ring.trusted_signers))
        self.follower: ConfigFollower | None = None
        if follow:
            self.follow()

    def follow(self) -> None:
        """Subscribe to our group's config (a fleet registers first, then follows: see the benchmark)."""
        pub, snapshot, topic, keyring, verifier = self._follow_args
        self.follower = self.loop.call_sync(lambda: ConfigFollower(
            self.loop, pub_endpoint=pub, snapshot_endpoint=snapshot, topic=topic, keyring=keyring,
            server="pilot", verifier=verifier, on_update=self._on_update, name=self.id), timeout=60)

    def _on_update(self, update: ConfigUpdate) -> None:
        version = update.version
        if version == self.applied:
            return  # already running it: nothing to apply, nothing to say
        try:
            config = update.config() if self.keep_config or self.reject else None
            error = self.reject(config) if self.reject else None
        except ValueError as exc:
            config, error = None, str(exc)
        if error:
            self.rejected.append(version)
            self._queue("nack", {"proxy": self.id, "version": version, "error": error,
                                 "in_force": self.applied})
            return
        self.applied, self.applied_config = version, config
        self.applies += 1
        self._queue("ack", {"proxy": self.id, "version": version})
        if self.on_apply is not None:
            self.on_apply(version)

    def _queue(self, method: str, body: dict[str, Any]) -> None:
        """ACK/NACK without blocking the loop; pilot away: the next change is ACKed anew."""
        self._rpc.call(method, body, lambda _result, _error: None)

    def heartbeat_every(self, interval: float) -> None:
        """Renew from the loop on a timer, as the sidecar does, without blocking anyone."""
        self._heartbeats = self.loop.call_sync(lambda: keep_registered(
            self.loop, self._rpc, self.id, self.id, lambda: {**self.workload, "version": self.applied},
            interval), timeout=60)

    def close(self) -> None:
        if self._heartbeats is not None:
            self.loop.call_sync(self._heartbeats.cancel)
        if self.follower is not None:
            self.loop.call_sync(self.follower.close)
        self.loop.call_sync(self._rpc.close)
