"""Helpers every networking builder shares (Istio's pilot/pkg/networking/util)."""

from __future__ import annotations

from typing import Any

from controlplane.config.validators import parse_duration

PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND = "inbound"
OUTBOUND = "outbound"


def cluster_name(direction: str, port: int, subset: str = "", host: str = "") -> str:
    """Istio's cluster naming, so names read the same in zmesh and Envoy dumps."""
    return f"{direction}|{port}|{subset}|{host}"


def millis(duration: Any, default: int = 0) -> int:
    """A protobuf duration ("1.5s") as whole milliseconds: the proxy never parses durations."""
    seconds = parse_duration(duration) if isinstance(duration, str) else None
    return default if seconds is None else round(seconds * 1000)


def percent(value: Any, legacy: Any = None, default: float = 100.0) -> float:
    """`percentage: {value}` first, then a deprecated integer percent field, else `default`."""
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        return float(value["value"])
    if isinstance(legacy, int | float) and not isinstance(legacy, bool):
        return float(legacy)
    return default


def pick(spec: Any, fields: dict[str, str], durations: tuple[str, ...] = ()) -> dict[str, Any]:
    """The set `fields` of an Istio object under zmesh's names; durations become milliseconds."""
    if not isinstance(spec, dict):
        return {}
    return {dst: millis(spec[src]) if src in durations else spec[src]
            for src, dst in fields.items() if spec.get(src) is not None}


def exported_to(owner: str, export_to: Any, namespace: str) -> bool:
    """Istio's exportTo: absent or `*` is everywhere, `.` the owner's namespace, `~` nowhere."""
    if not export_to:
        return True
    return any(e == "*" or e == namespace or (e == "." and owner == namespace) for e in export_to)
