"""A minimal etcd v3 client over etcd's own JSON gateway (/v3/kv/*, /v3/watch).

Why not a client library: the Python etcd3 clients are gRPC-based and unmaintained;
the JSON gateway ships inside etcd itself, so plain HTTP from the standard library
is the dependency-free and version-stable choice.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class EtcdError(Exception):
    pass


class Compacted(EtcdError):
    """The revision we wanted to resume from has been compacted away: reload in full."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def prefix_end(prefix: str) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    type: str  # PUT | DELETE
    key: str
    value: str
    revision: int


class EtcdClient:
    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"etcd endpoint must be http://host:port, got {endpoint!r}")
        self.host, self.port = parts.hostname, parts.port or 2379
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise EtcdError(f"etcd {self.host}:{self.port}{path}: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise EtcdError(f"etcd {path}: HTTP {resp.status}: {data.get('error') or data}")
        return data

    def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        data = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        revision = int(data.get("header", {}).get("revision", 0))
        return revision, [_kv(kv) for kv in data.get("kvs", [])]

    def put(self, key: str, value: str) -> int:
        data = self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(data.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        data = self._post("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    def compact(self, revision: int) -> None:
        self._post("/v3/kv/compaction", {"revision": revision, "physical": True})

    def watch(self, prefix: str, start_revision: int, idle_timeout: float = 30.0) -> Iterator[WatchEvent]:
        """Stream events from `start_revision` on; raises Compacted, or EtcdError when the stream
        breaks. etcd sends progress notifications, so an idle stream still proves liveness."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=idle_timeout)
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": start_revision, "progress_notify": True}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"etcd watch: HTTP {resp.status}")
            while True:
                line = resp.readline()
                if not line:
                    raise EtcdError("etcd watch stream closed")
                result = json.loads(line).get("result", {})
                compact = int(result.get("compact_revision", 0) or 0)
                if compact:
                    raise Compacted(compact)
                if result.get("canceled"):
                    raise EtcdError(f"etcd watch canceled: {result.get('cancel_reason', '')}")
                for ev in result.get("events", []):
                    kv = _kv(ev["kv"])
                    yield WatchEvent(ev.get("type", "PUT"), kv.key, kv.value, kv.mod_revision)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise EtcdError(f"etcd watch: {exc}") from None
        finally:
            conn.close()


def _kv(kv: dict[str, Any]) -> KeyValue:
    value = base64.b64decode(kv.get("value", "")).decode(errors="replace")
    return KeyValue(base64.b64decode(kv["key"]).decode(errors="replace"), value,
                    int(kv.get("mod_revision", 0)))
