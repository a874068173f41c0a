"""The registration lease table: workloads node agents (or proxies) register at run time, each held
by its node's lease and changed only by its owners. Sans-IO: time is passed in as `now`."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controlplane.pilot.model import Proxy
from controlplane.pilot.serviceregistry.model import REGISTRATION, Workload, as_str, content_digest


@dataclass
class _Registration:
    workload: Workload
    lease: float
    expires: float
    digest: int
    owners: frozenset[str]


def _registered(workload: dict[str, Any], node: str) -> Workload:
    """Check what a node agent sent: it comes over the wire, so nothing is taken on trust."""
    wid, namespace, ip = workload.get("id"), workload.get("namespace"), workload.get("ip")
    if not isinstance(wid, str) or not wid:
        raise ValueError("workload id must be a non-empty string")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"workload {wid}: namespace must be a non-empty string")
    try:
        ipaddress.ip_address(ip if isinstance(ip, str) else "")
    except ValueError:
        raise ValueError(f"workload {wid}: ip {ip!r} is not an IP address") from None
    labels, ports = workload.get("labels") or {}, workload.get("ports") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValueError(f"workload {wid}: labels must map strings to strings")
    if not isinstance(ports, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
            for k, v in ports.items()):
        raise ValueError(f"workload {wid}: ports must map names to port numbers")
    account = workload.get("service_account") or "default"
    if not isinstance(account, str):
        raise ValueError(f"workload {wid}: service_account must be a string")
    return Workload(REGISTRATION, wid, namespace, dict(labels), address=str(ip), ports=dict(ports),
                    locality=as_str(workload.get("locality")), service_account=account, node=node)


def _sidecar(w: Workload) -> Proxy:
    return Proxy(w.name, w.namespace, w.address, dict(w.labels), w.service_account, w.node, w.locality)


class Registrations:
    """Workloads node agents registered, each held by its node's lease.

    A node renews all its workloads with one heartbeat; when a node dies its heartbeats
    stop and `expire` drops its workloads once their lease runs out.

    A registration belongs to the identity that filed it (its `node`: a node agent, or a proxy
    registering itself) and to the node agent such a proxy names; only they may replace, renew
    or remove it (`may_change`), so one key cannot take another's workload out of the mesh.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, _Registration] = {}
        self._by_node: dict[str, set[str]] = defaultdict(set)
        self._digest = 0  # XOR of the registrations' digests: O(1) to keep, order-independent

    def register(self, workload: dict[str, Any], node: str, now: float, lease: float,
                 agent: str = "") -> Workload:
        """Add or replace (same id: a restarted workload) a registration filed by `node`; `agent`:
        the node agent a self-registering proxy names, which may manage it too. Raises ValueError."""
        if lease <= 0:
            raise ValueError(f"lease must be positive, got {lease}")
        w = _registered(workload, node)
        self.deregister(w.name)
        digest = int.from_bytes(content_digest(dataclasses.asdict(w))[:16])
        owners = frozenset(o for o in (node, agent) if o)
        self._by_id[w.name] = _Registration(w, lease, now + lease, digest, owners)
        self._by_node[node].add(w.name)
        self._digest ^= digest
        return w

    def may_change(self, wid: str, caller: str) -> bool:
        """Whether `caller` may register, renew or remove `wid` (anyone may take a free id)."""
        reg = self._by_id.get(wid)
        return reg is None or caller in reg.owners

    def heartbeat(self, node: str, now: float, ids: Iterable[str] = ()) -> int:
        """Renew every registration filed by `node`, and those of `ids` it owns; returns how many,
        so 0 tells an agent to re-register."""
        renew = set(self._by_node.get(node, ()))
        renew.update(wid for wid in ids if wid in self._by_id and node in self._by_id[wid].owners)
        for wid in renew:
            reg = self._by_id[wid]
            reg.expires = now + reg.lease
        return len(renew)

    def of_node(self, node: str) -> list[str]:
        return sorted(self._by_node.get(node, ()))

    def deregister(self, wid: str) -> bool:
        reg = self._by_id.pop(wid, None)
        if reg is None:
            return False
        node = reg.workload.node
        self._by_node[node].discard(wid)
        if not self._by_node[node]:
            del self._by_node[node]
        self._digest ^= reg.digest
        return True

    def expire(self, now: float) -> list[str]:
        """Drop the registrations whose lease ran out; returns their ids."""
        gone = sorted(wid for wid, reg in self._by_id.items() if reg.expires <= now)
        for wid in gone:
            self.deregister(wid)
        return gone

    def workloads(self) -> list[Workload]:
        return [self._by_id[wid].workload for wid in sorted(self._by_id)]

    def proxies(self) -> list[Proxy]:
        """Each registered workload's sidecar, as pilot configures it."""
        return [_sidecar(w) for w in self.workloads()]

    def proxy(self, wid: str) -> Proxy | None:
        reg = self._by_id.get(wid)
        return _sidecar(reg.workload) if reg else None

    @property
    def digest(self) -> str:
        """Changes iff the registered content does (heartbeats do not change it)."""
        return f"{self._digest:032x}"
