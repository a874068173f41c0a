"""Istio's HTTP metadata exchange, sans-IO: who the peer sidecar's workload is, for the metrics.

A client sidecar adds `x-envoy-peer-metadata-id` and `x-envoy-peer-metadata` (base64 of its node
metadata as compact JSON) to requests towards in-mesh upstreams; the server sidecar removes them,
reports the client's workload as `source_*`, and answers with its own pair, which the client
sidecar removes and reports as `destination_*`. Only the fields `stats.Workload` needs are sent:
NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID and LABELS (app, version and Istio's canonical
service/revision labels).

Our own header lines are built once per worker (`header_lines`). Peers' values go through
`PeerCache`, keyed by the raw header bytes: a steady peer costs one dict lookup. A malformed value
leaves the peer unknown (cached too, so garbage costs no more than a good value) and is never an
error to the client.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from dataplane.proxy.stats import LATEST, UNKNOWN, Key, Stats, Workload

HEADER_ID = b"x-envoy-peer-metadata-id"
HEADER = b"x-envoy-peer-metadata"
HEADERS = frozenset({HEADER_ID, HEADER})
MAX_VALUE = 8192  # a longer header value is not metadata any sidecar of ours sends
CACHE_SIZE = 1024  # distinct raw values remembered per worker (oldest dropped first)

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"


def encode(workload: Workload, node_id: str) -> bytes:
    """The `x-envoy-peer-metadata` value for `workload` (Istio's node metadata names)."""
    labels = {"app": workload.app, "version": workload.version, CANONICAL_NAME: workload.canonical_service,
              CANONICAL_REVISION: workload.canonical_revision}
    meta = {"NAME": node_id, "NAMESPACE": workload.namespace, "WORKLOAD_NAME": workload.name,
            "LABELS": {k: v for k, v in labels.items() if v and v not in (UNKNOWN, LATEST)},
            "CLUSTER_ID": workload.cluster}
    raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return base64.b64encode(raw)


def header_lines(workload: Workload, node_id: str) -> bytes:
    """Both header fields as head lines, each ending in CRLF, ready to insert into a head."""
    if not node_id or not node_id.isprintable() or not node_id.isascii():
        raise ValueError(f"peer metadata id must be printable ASCII, not {node_id!r}")
    return b"%s: %s\r\n%s: %s\r\n" % (HEADER_ID, node_id.encode(), HEADER, encode(workload, node_id))


def decode(value: bytes) -> Workload | None:
    """The peer's workload from an `x-envoy-peer-metadata` value; None when malformed."""
    if len(value) > MAX_VALUE:
        return None
    try:
        meta = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):  # bad base64, bad UTF-8 or bad JSON
        return None
    if not isinstance(meta, dict):
        return None
    labels = meta.get("LABELS") or {}
    if not isinstance(labels, dict):
        return None
    name, namespace, cluster = (_str(meta.get(k)) for k in ("WORKLOAD_NAME", "NAMESPACE", "CLUSTER_ID"))
    app, version = _str(labels.get("app")), _str(labels.get("version"))
    if None in (name, namespace, cluster, app, version):
        return None
    # Istio's canonical labels fall back to app.kubernetes.io/*, app / version, then the workload
    service = _str(labels.get(CANONICAL_NAME)) or _str(labels.get("app.kubernetes.io/name")) or app or name
    revision = (_str(labels.get(CANONICAL_REVISION)) or _str(labels.get("app.kubernetes.io/version"))
                or version or LATEST)
    return Workload(name=name or UNKNOWN, namespace=namespace or UNKNOWN, app=app or UNKNOWN,
                    version=version or UNKNOWN, canonical_service=service or UNKNOWN,
                    canonical_revision=revision, cluster=cluster or UNKNOWN)


def _str(value: Any) -> str | None:
    """A metadata string ("" when absent); None when present but not a string."""
    if value is None:
        return ""
    return value if isinstance(value, str) else None


class Peer:
    """A decoded peer and the stats keys already adjusted for it (Key -> Key, by identity)."""

    __slots__ = ("keys", "workload")

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.keys: dict[Key, Key] = {}

    def key(self, stats: Stats, key: Key) -> Key:
        """`key` with this peer's workload labels; one dict lookup once seen."""
        found = self.keys.get(key)
        if found is None:
            found = self.keys[key] = stats.with_peer(key, self.workload)
        return found


class PeerCache:
    """Raw header value -> Peer (None: malformed), at most `size` entries, oldest dropped first."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"peer cache size must be at least 1, not {size}")
        self.size = size
        self.peers: dict[bytes, Peer | None] = {}

    def get(self, value: bytes) -> Peer | None:
        peers = self.peers
        try:
            return peers[value]
        except KeyError:
            pass
        workload = decode(value)
        if len(peers) >= self.size:
            del peers[next(iter(peers))]
        peer = peers[value] = Peer(workload) if workload is not None else None
        return peer
