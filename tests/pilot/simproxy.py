"""A simulated sidecar: registers with pilot, follows its group's config key, ACKs or NACKs.

It is a real bus client (CURVE RPC + a Subscriber), used by tests and the convergence
benchmark; `reject` makes it NACK, as a proxy does with config it cannot apply.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Subscriber
from bus.rpc import RpcClient
from bus.signing import Verifier


class SimProxy:
    def __init__(self, loop: Loop, ring: Keyring, *, proxy_id: str, namespace: str, ip: str,
                 labels: dict[str, str], pilot_rpc: str, pilot_pub: str, pilot_snapshot: str,
                 service_account: str = "default", verifier: Verifier | None = None,
                 reject: Callable[[dict[str, Any]], str | None] | None = None,
                 on_apply: Callable[[str], None] | None = None) -> None:
        self.id = proxy_id
        self.applied = ""
        self.applied_config: dict[str, Any] | None = None
        self.rejected: list[str] = []
        self.applies = 0
        self.reject = reject
        self.on_apply = on_apply
        self.loop = loop
        self._rpc = RpcClient(pilot_rpc, ring, "pilot", origin=ring.name, timeout=2, retries=3)
        self._acks: list[tuple[str, dict[str, Any]]] = []
        self._ack_ready = threading.Event()
        self.workload = {"id": proxy_id, "namespace": namespace, "ip": ip, "labels": labels,
                         "service_account": service_account, "node": proxy_id}
        reply = self._rpc.call("register", self.workload)
        self.group = reply["group"]
        self._sender = threading.Thread(target=self._send_acks, daemon=True)
        self._stop = threading.Event()
        self._sender.start()
        self.subscriber = loop.call_sync(lambda: Subscriber(
            loop, pub_endpoint=pilot_pub, snapshot_endpoint=pilot_snapshot, prefix=reply["topic"],
            keyring=ring, server="pilot", verifier=verifier or Verifier(ring.trusted_signers),
            on_change=self._on_config, name=proxy_id, silence_timeout=3.0))

    def _on_config(self, key: str, config: Any) -> None:
        if config is None:
            return
        version = config.get("version", "")
        if version == self.applied:
            return  # already running it: nothing to apply, nothing to say
        error = self.reject(config) if self.reject else None
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
        self._acks.append((method, body))
        self._ack_ready.set()

    def _send_acks(self) -> None:
        """ACKs go out from their own thread: RPC is blocking, the loop must not be."""
        while not self._stop.is_set():
            if not self._ack_ready.wait(0.1):
                continue
            self._ack_ready.clear()
            while self._acks:
                method, body = self._acks.pop(0)
                with contextlib.suppress(Exception):  # pilot away: the next change is ACKed anew
                    self._rpc.call(method, body)

    def heartbeat(self) -> None:
        """Renew our lease; a pilot that no longer knows us (it restarted) gets us again."""
        reply = self._rpc.call("heartbeat", {"node": self.id})
        if not reply.get("renewed"):
            self._rpc.call("register", {**self.workload, "version": self.applied})

    def close(self) -> None:
        self._stop.set()
        self._sender.join(2)
        self._rpc.close()
