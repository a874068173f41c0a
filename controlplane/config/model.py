"""Typed config resources: Istio's kinds plus the Kubernetes kinds users' files mix in.

Different API versions of one kind normalise to one internal form: `group/kind`
with the spec as written (every supported version of these kinds shares its fields).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from controlplane.config.yamlload import Document, Path

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"

# kind -> (group, accepted versions)
ISTIO_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "VirtualService": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "DestinationRule": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "ServiceEntry": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "WorkloadEntry": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "Gateway": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "Sidecar": (NETWORKING, ("v1alpha3", "v1beta1", "v1")),
    "PeerAuthentication": (SECURITY, ("v1beta1", "v1")),
    "AuthorizationPolicy": (SECURITY, ("v1beta1", "v1")),
    "RequestAuthentication": (SECURITY, ("v1beta1", "v1")),
}
# Kubernetes kinds we read (services, workloads, namespaces); group "" is core.
KUBE_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Service": ("", ("v1",)),
    "Pod": ("", ("v1",)),
    "Namespace": ("", ("v1",)),
    "ServiceAccount": ("", ("v1",)),
    "Deployment": ("apps", ("v1",)),
}
SUPPORTED = {**ISTIO_KINDS, **KUBE_KINDS}
CLUSTER_SCOPED = {"Namespace"}


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


@dataclass(frozen=True, order=True)
class Key:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass
class Resource:
    api_version: str
    kind: str
    name: str
    namespace: str
    spec: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    doc: Document | None = None

    @property
    def key(self) -> Key:
        return Key(self.kind, self.namespace, self.name)

    @property
    def group(self) -> str:
        return split_api_version(self.api_version)[0]

    @property
    def file(self) -> str:
        return self.doc.file if self.doc else ""

    def line_of(self, path: Path = ()) -> int:
        return self.doc.line_of(path) if self.doc else 0

    def normalized(self) -> dict[str, Any]:
        """The internal form: one shape for every API version of the kind."""
        group = SUPPORTED.get(self.kind, (self.group, ()))[0]
        out: dict[str, Any] = {"kind": self.kind, "group": group, "name": self.name,
                               "namespace": self.namespace, "spec": self.spec}
        if self.labels:
            out["labels"] = self.labels
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @functools.cached_property
    def content_hash(self) -> str:
        """A hash of the normalised form (resources are not mutated once loaded)."""
        blob = json.dumps(self.normalized(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]
