"""Every control-plane port in one place. `ZMESH_PORT_BASE` (or `--port-base`) moves the whole
set, so tests can run many meshes side by side. Sidecar ports are Istio's and stay fixed
(meshapi/ports.py)."""

from __future__ import annotations

import os

DEFAULT_BASE = 16000

# offset from the base, per component and socket
OFFSETS = {
    ("galley", "pub"): 0, ("galley", "snapshot"): 1, ("galley", "metrics"): 9,
    ("pilot", "pub"): 10, ("pilot", "snapshot"): 11, ("pilot", "rpc"): 12, ("pilot", "metrics"): 19,
    ("citadel", "pub"): 20, ("citadel", "snapshot"): 21, ("citadel", "rpc"): 22,
    ("citadel", "metrics"): 29,
    ("mixer-telemetry", "reports"): 30, ("mixer-telemetry", "metrics"): 39,
    ("mixer-policy", "rpc"): 40, ("mixer-policy", "metrics"): 49,
    ("nodeagent", "metrics"): 59,
}

def port_base() -> int:
    return int(os.environ.get("ZMESH_PORT_BASE", DEFAULT_BASE))


def port(component: str, socket: str, base: int | None = None) -> int:
    return (port_base() if base is None else base) + OFFSETS[(component, socket)]


def tcp(component: str, socket: str, host: str = "127.0.0.1", base: int | None = None) -> str:
    return f"tcp://{host}:{port(component, socket, base)}"
