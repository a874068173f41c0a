"""Per-listener settings of the HTTP engine: the fields of Envoy's HttpConnectionManager that zmesh
honours, read from an HTTP listener's optional `http` entry in the proxy config.

    http?: {request_headers_timeout_ms?, stream_idle_timeout_ms?, idle_timeout_ms?, upgrade_types?: [str]}

A duration of 0 turns that timeout off (as in Envoy; held as infinity). Absent fields take the
defaults below, which are stricter than Envoy's where a sidecar faces clients it does not trust:

* `request_headers_timeout` 10 s (Envoy: off): a head must arrive whole within it, else 408.
* `stream_idle_timeout` 60 s (Envoy: 5 min): a request whose body stops arriving for this long gets
  408 (flag SI) and its upstream connection is closed. 60 s is nginx's `client_body_timeout`, the
  same idle-between-reads rule: slow uploads pass, a stalled client holds a connection (and an
  upstream one) for a minute rather than five.
* `idle_timeout` 1 h (Envoy's downstream default, kept by Istio): a keep-alive connection between
  requests, or a tunnel, with no traffic for this long is closed.
* `upgrade_types` ["websocket"] (Istio's HCM `upgrade_configs`): the Upgrade values that may turn
  the connection into a tunnel, compared without case; "CONNECT" allows CONNECT (see upgrades.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_FIELDS = ("request_headers_timeout_ms", "stream_idle_timeout_ms", "idle_timeout_ms", "upgrade_types")


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Timeouts in seconds (math.inf: off) and the allowed upgrade types, lower-cased."""

    request_headers_timeout: float = 10.0
    stream_idle_timeout: float = 60.0
    idle_timeout: float = 3600.0
    upgrade_types: frozenset[bytes] = frozenset({b"websocket"})


DEFAULT = HttpOptions()


def http_options(spec: Mapping[str, Any] | None) -> HttpOptions:
    """The options of a listener's `http` entry; ValueError names a bad field (the config is NACKed)."""
    if not spec:
        return DEFAULT
    if not isinstance(spec, Mapping):
        raise ValueError(f"listener http options must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown listener http option(s): {', '.join(unknown)}")
    types = spec.get("upgrade_types")
    if types is None:
        upgrades = DEFAULT.upgrade_types
    elif isinstance(types, list) and all(isinstance(t, str) and t for t in types):
        upgrades = frozenset(t.lower().encode("latin-1") for t in types)
    else:
        raise ValueError(f"upgrade_types must be a list of non-empty strings, got {types!r}")
    return HttpOptions(_seconds(spec, "request_headers_timeout_ms", DEFAULT.request_headers_timeout),
                       _seconds(spec, "stream_idle_timeout_ms", DEFAULT.stream_idle_timeout),
                       _seconds(spec, "idle_timeout_ms", DEFAULT.idle_timeout), upgrades)


def _seconds(spec: Mapping[str, Any], name: str, default: float) -> float:
    value = spec.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a duration in milliseconds (0: off), got {value!r}")
    return value / 1000 if value else math.inf
