"""Node authorization: may the node agent that asks (its CURVE key name, from ZAP) obtain this identity?

Istio's CA asks Kubernetes which pods run on the requesting node. zmesh asks pilot which workloads
are registered on it (RPC `workloads`, see PILOT_RPC.md). A node agent can thus obtain only
identities of workloads on its own node, and a stolen node key exposes that node's identities
alone, not the mesh's.

An authorizer is any callable `(node, namespace, service_account) -> None | "code: detail"`:
None allows; otherwise `code` (lowercase, a metric label) says why not and `detail` tells the
operator what to fix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from bus.keys import Keyring
from bus.loop import Loop
from bus.rpc import AsyncRpcClient, RpcError, RpcTimeout

Pair = tuple[str, str]  # (namespace, service account)


class NodeAuthorizer(Protocol):
    def __call__(self, node: str, namespace: str, service_account: str) -> str | None: ...


def _decide(node: str, wanted: Pair, allowed: frozenset[Pair]) -> str | None:
    if wanted in allowed:
        return None
    if not allowed:
        return f"unknown_node: no workloads are registered on node {node!r}"
    return (f"not_on_node: no workload of namespace {wanted[0]!r} with service account {wanted[1]!r} "
            f"is registered on node {node!r}")


class StaticAuthorizer:
    """A fixed node -> identities map (tests, and meshes whose placement never changes)."""

    def __init__(self, mapping: Mapping[str, Iterable[Pair]]) -> None:
        self.mapping = {node: frozenset(pairs) for node, pairs in mapping.items()}

    def __call__(self, node: str, namespace: str, service_account: str) -> str | None:
        return _decide(node, (namespace, service_account), self.mapping.get(node, frozenset()))


def trust_node_agents(node: str, namespace: str, service_account: str) -> None:
    """`--trust-node-agents`: any authenticated node agent gets any identity (development only)."""
    return None


class RegistrationsAuthorizer:
    """Asks pilot (RPC `workloads` {"node"} -> [{"namespace", "service_account"}]) and caches each
    node's answer for `fresh_s`. An identity missing from a cached answer is asked again once the
    answer is `recheck_s` old (the workload may have registered a moment ago), so a node that
    floods bad requests costs pilot at most 1/recheck_s calls a second. When pilot does not
    answer, requests fail fast for `down_s` instead of each blocking on the timeout.

    `call(method, body)` is a blocking RPC to pilot (see `pilot_rpc`): citadel's handlers answer
    synchronously, so it runs in citadel's loop thread; keep its timeout short."""

    def __init__(self, call: Callable[[str, Any], Any], fresh_s: float = 1.0, recheck_s: float = 0.1,
                 down_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._call = call
        self.fresh_s, self.recheck_s, self.down_s = fresh_s, recheck_s, down_s
        self._clock = clock
        self._cache: dict[str, tuple[float, frozenset[Pair]]] = {}
        self._down_until = -math.inf
        self._down_reason = ""

    def __call__(self, node: str, namespace: str, service_account: str) -> str | None:
        now = self._clock()
        wanted = (namespace, service_account)
        fetched, allowed = self._cache.get(node, (-math.inf, frozenset()))
        age = now - fetched
        if age > self.fresh_s or (wanted not in allowed and age >= self.recheck_s):
            if now < self._down_until:
                return self._down_reason
            try:
                allowed = self._fetch(node)
            except (RpcError, RpcTimeout, ValueError) as exc:
                self._down_until = now + self.down_s
                self._down_reason = f"authorizer_unavailable: pilot: {exc}"
                return self._down_reason
            self._cache[node] = (now, allowed)
        return _decide(node, wanted, allowed)

    def _fetch(self, node: str) -> frozenset[Pair]:
        reply = self._call("workloads", {"node": node})
        if not isinstance(reply, list):
            raise ValueError(f"workloads: expected a list, got {type(reply).__name__}")
        pairs = set()
        for row in reply:
            ns = row.get("namespace") if isinstance(row, dict) else None
            sa = row.get("service_account") if isinstance(row, dict) else None
            if not isinstance(ns, str) or not isinstance(sa, str):
                raise ValueError(f"workloads: malformed row {row!r}")
            pairs.add((ns, sa))
        return frozenset(pairs)


def pilot_rpc(loop: Loop, endpoint: str, keyring: Keyring, server: str = "pilot", origin: str = "citadel",
              timeout: float = 0.5) -> Callable[[str, Any], Any]:
    """A blocking call to pilot for RegistrationsAuthorizer, bounded by about 2 x `timeout`. The client
    lives on `loop`, which must not be citadel's (that one waits): an AsyncRpcClient never blocks on
    send, whereas RpcClient's send blocks for good once pilot's ZAP has refused our key."""
    client = loop.call_sync(lambda: AsyncRpcClient(loop, endpoint, keyring, server, origin=origin,
                                                   timeout=timeout, retries=1))
    loop.on_close(client.close)
    return lambda method, body: client.call_wait(method, body, timeout=2 * timeout + 0.5)
