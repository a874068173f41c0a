"""The node's workloads, sans-IO: parsing a workload description and diffing the set.

Workloads come from two sources, each naming its own units: files in the workloads
directory (`file:<name>`) and announcements over the local RPC (`rpc:<id>`). A unit holds
at most one workload. `Inventory` merges the units into one set keyed by workload id and
reports what changed, so the shell only ever acts on differences.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshapi.identity import valid_namespace, valid_service_account


class WorkloadError(ValueError):
    """A workload description that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Workload:
    id: str
    namespace: str
    service_account: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def identity(self) -> tuple[str, str]:
        """Workloads with one namespace and service account share a certificate (as Istio's SDS)."""
        return (self.namespace, self.service_account)

    def registration(self, node: str) -> dict[str, Any]:
        """Pilot's `register` body."""
        return {"id": self.id, "namespace": self.namespace, "ip": self.ip, "labels": dict(self.labels),
                "service_account": self.service_account, "ports": dict(self.ports), "node": node}


def _id(value: Any) -> str:
    """The id names the workload's certificate directory: keep it a plain file name."""
    if not isinstance(value, str) or not value or len(value) > 253 or value.startswith(".") or any(
            c in value for c in "/\\ \t\n\0"):
        raise WorkloadError(f"id must be a non-empty name without '/', spaces or a leading '.', "
                            f"got {value!r}")
    return value


def _dns(value: Any, what: str, subdomain: bool) -> str:
    """Kubernetes' rules, which citadel applies to SPIFFE ids: refuse here what it would refuse."""
    valid = valid_service_account if subdomain else valid_namespace
    if not (isinstance(value, str) and valid(value)):
        kind = "DNS-1123 subdomain" if subdomain else "DNS-1123 label"
        raise WorkloadError(f"{what} must be a {kind} (lowercase letters, digits, '-'), got {value!r}")
    return value


def parse_workload(data: Any) -> Workload:
    """Check a workload description (a file's content or an RPC body)."""
    if not isinstance(data, dict):
        raise WorkloadError("a workload must be a mapping")
    unknown = set(data) - {"id", "namespace", "service_account", "labels", "ip", "ports"}
    if unknown:
        raise WorkloadError(f"unknown fields: {', '.join(sorted(unknown))}")
    wid = _id(data.get("id"))
    namespace = _dns(data.get("namespace", "default"), "namespace", subdomain=False)
    account = _dns(data.get("service_account", "default"), "service_account", subdomain=True)
    ip = data.get("ip")
    try:
        ipaddress.ip_address(ip if isinstance(ip, str) else "")
    except ValueError:
        raise WorkloadError(f"ip {ip!r} is not an IP address") from None
    labels, ports = data.get("labels") or {}, data.get("ports") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise WorkloadError("labels must map strings to strings")
    if not isinstance(ports, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
            for k, v in ports.items()):
        raise WorkloadError("ports must map names to port numbers")
    return Workload(wid, namespace, account, ip, dict(labels), dict(ports))


def parse_text(text: str, name: str) -> Workload:
    """A workload file: JSON (by its name) or YAML, one workload per file."""
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise WorkloadError(f"not valid {'JSON' if name.endswith('.json') else 'YAML'}: {exc}") from None
    return parse_workload(data)


@dataclass
class Changes:
    added: list[Workload] = field(default_factory=list)
    changed: list[tuple[Workload, Workload]] = field(default_factory=list)  # (old, new)
    removed: list[Workload] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (unit ignored, workload id)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class Inventory:
    """Units -> workloads, merged by id. Two units claiming one id: the first by unit name wins
    (files before RPC announcements), the other is reported as a conflict and ignored."""

    def __init__(self) -> None:
        self.units: dict[str, Workload] = {}
        self.current: dict[str, Workload] = {}

    def set(self, unit: str, workload: Workload | None) -> Changes:
        """The unit now holds `workload` (None: it is gone); returns what that changed."""
        if workload is None:
            self.units.pop(unit, None)
        else:
            self.units[unit] = workload
        merged: dict[str, Workload] = {}
        out = Changes()
        for name in sorted(self.units):
            w = self.units[name]
            if w.id in merged:
                out.conflicts.append((name, w.id))
            else:
                merged[w.id] = w
        out.added = [merged[i] for i in sorted(merged.keys() - self.current.keys())]
        out.removed = [self.current[i] for i in sorted(self.current.keys() - merged.keys())]
        out.changed = [(self.current[i], merged[i]) for i in sorted(merged.keys() & self.current.keys())
                       if self.current[i] != merged[i]]
        self.current = merged
        return out
