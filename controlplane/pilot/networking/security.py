"""Peer authentication and authorization for one workload (Istio's pilot/pkg/security/...).

The inbound side of a proxy enforces two things: whether callers must present a mesh
certificate (the PeerAuthentication mode, per port) and which requests to let through
(the AuthorizationPolicies selecting the workload). Both are resolved here, once, so
the proxy never walks policy hierarchies itself.
"""

from __future__ import annotations

from typing import Any

from controlplane.config.model import Resource
from controlplane.pilot.model import Proxy, matches
from controlplane.pilot.networking.push_context import PushContext
from meshapi.config import Security

PERMISSIVE = "PERMISSIVE"
STRICT = "STRICT"
DISABLE = "DISABLE"
UNSET = "UNSET"
# Istio evaluates CUSTOM, then DENY, then ALLOW; AUDIT only logs.
ACTION_ORDER = ("CUSTOM", "DENY", "ALLOW", "AUDIT")


def _selector(policy: Resource) -> dict[str, str]:
    return (policy.spec.get("selector") or {}).get("matchLabels") or {}


def _mode(policy: Resource | None) -> str:
    return ((policy.spec.get("mtls") or {}).get("mode") or UNSET) if policy else UNSET


def _namespace_wide(policies: list[Resource]) -> Resource | None:
    """The oldest policy without a selector (Istio ignores any later ones)."""
    return next((p for p in policies if not _selector(p)), None)


def _selecting(policies: list[Resource], labels: dict[str, str]) -> Resource | None:
    """The oldest policy whose selector picks these labels."""
    return next((p for p in policies if _selector(p) and matches(_selector(p), labels)), None)


def namespace_mtls_mode(push: PushContext, namespace: str) -> str:
    """The mode a namespace's workloads get without a workload policy: namespace > mesh > PERMISSIVE."""
    def build() -> str:
        for ns in (namespace, push.root_namespace):
            mode = _mode(_namespace_wide(push.peer_authentications.get(ns, [])))
            if mode != UNSET:
                return mode
        return PERMISSIVE
    return push.cached(("mtls", namespace), build)


def peer_authentication(push: PushContext, proxy: Proxy) -> tuple[str, dict[int, str]]:
    """The workload's mTLS mode and its per-port overrides (a port's UNSET inherits)."""
    workload = _selecting(push.peer_authentications.get(proxy.namespace, []), proxy.labels)
    mode = _mode(workload)
    if mode == UNSET:
        mode = namespace_mtls_mode(push, proxy.namespace)
    ports: dict[int, str] = {}
    for port, setting in ((workload.spec.get("portLevelMtls") or {}) if workload else {}).items():
        port_mode = (setting or {}).get("mode") or UNSET
        ports[int(port)] = mode if port_mode == UNSET else port_mode
    return mode, dict(sorted(ports.items()))


def authorization_policies(push: PushContext, proxy: Proxy) -> list[Resource]:
    """Policies that apply to the workload: root-namespace ones mesh-wide (a selector there
    picks workloads in every namespace), and its own namespace's, in evaluation order."""
    def applies(policy: Resource) -> bool:
        return matches(_selector(policy), proxy.labels)

    found = [p for p in push.authorization_policies.get(push.root_namespace, []) if applies(p)]
    if proxy.namespace != push.root_namespace:
        found += [p for p in push.authorization_policies.get(proxy.namespace, []) if applies(p)]
    rank = {action: i for i, action in enumerate(ACTION_ORDER)}
    return sorted(found, key=lambda p: (rank[p.spec.get("action", "ALLOW")], p.namespace, p.name))


def build_security(push: PushContext, proxy: Proxy) -> Security:
    mode, ports = peer_authentication(push, proxy)
    policies = []
    for p in authorization_policies(push, proxy):
        entry: dict[str, Any] = {"name": f"{p.namespace}/{p.name}", "action": p.spec.get("action", "ALLOW"),
                                 "rules": p.spec.get("rules") or []}
        if p.spec.get("provider"):
            entry["provider"] = p.spec["provider"].get("name", "")
        policies.append(entry)
    return {"mtls": {"mode": mode, "ports": {str(port): m for port, m in ports.items()}},
            "authorization": policies, "path_normalization": push.path_normalization}
