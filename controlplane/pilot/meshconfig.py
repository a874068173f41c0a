"""Istio's MeshConfig for pilot: the file `pilot-discovery --meshConfig` reads (the `mesh` key of the
`istio` ConfigMap), with the fields zmesh acts on checked and every other field named in a warning.

A bad file at start is an error that names the problem; a bad file later (pilot re-reads it when it
changes) is logged and the config in force stays, as a NACKed proxy config does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bus.logs import Log
from controlplane.config.validators import parse_duration

OUTBOUND_MODES = ("ALLOW_ANY", "REGISTRY_ONLY")
# The fields pilot acts on; the rest of Istio's MeshConfig is accepted with a warning naming it.
SUPPORTED = ("rootNamespace", "trustDomain", "enableAutoMtls", "connectTimeout", "outboundTrafficPolicy",
             "pathNormalization")
# meshConfig.pathNormalization.normalization; DEFAULT is BASE (the proxy's dataplane.proxy.http.pathnorm)
PATH_NORMALIZATIONS = ("DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")


class MeshConfigError(ValueError):
    """A mesh config that cannot be used; the message names the file and the field."""


def parse_mesh_config(text: str, source: str = "mesh config") -> tuple[dict[str, Any], list[str]]:
    """(the fields pilot uses, warnings for the fields it ignores) or MeshConfigError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MeshConfigError(f"{source}: not YAML: {exc}") from None
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise MeshConfigError(f"{source}: must be a mapping of MeshConfig fields, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for field in ("rootNamespace", "trustDomain"):
        if field in data:
            if not isinstance(data[field], str) or not data[field]:
                raise MeshConfigError(f"{source}: {field} must be a non-empty string")
            out[field] = data[field]
    if "enableAutoMtls" in data:
        if not isinstance(data["enableAutoMtls"], bool):
            raise MeshConfigError(f"{source}: enableAutoMtls must be true or false")
        out["enableAutoMtls"] = data["enableAutoMtls"]
    if "connectTimeout" in data:
        seconds = parse_duration(data["connectTimeout"])
        if seconds is None or seconds <= 0:
            raise MeshConfigError(f"{source}: connectTimeout must be a positive duration such as 10s, "
                                  f"got {data['connectTimeout']!r}")
        out["connectTimeout"] = data["connectTimeout"]
    if "outboundTrafficPolicy" in data:
        policy = data["outboundTrafficPolicy"]
        mode = policy.get("mode", "ALLOW_ANY") if isinstance(policy, dict) else None
        if mode not in OUTBOUND_MODES:
            raise MeshConfigError(f"{source}: outboundTrafficPolicy.mode must be one of "
                                  f"{', '.join(OUTBOUND_MODES)}, got {mode!r}")
        out["outboundTrafficPolicy"] = {"mode": mode}
    if "pathNormalization" in data:
        setting = data["pathNormalization"]
        kind = (setting.get("normalization") or "DEFAULT") if isinstance(setting, dict) else None
        if kind not in PATH_NORMALIZATIONS:
            raise MeshConfigError(f"{source}: pathNormalization.normalization must be one of "
                                  f"{', '.join(PATH_NORMALIZATIONS)}, got {kind!r}")
        out["pathNormalization"] = {"normalization": kind}
    warnings = [f"{source}: {field} is not supported by zmesh and is ignored"
                for field in data if field not in SUPPORTED]
    return out, warnings


class MeshConfigFile:
    """The mesh config file and whether it changed since the last look (mtime, size, inode)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False  # gone for a moment (a rename swap): keep what is in force
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    def read(self) -> tuple[dict[str, Any], list[str]]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise MeshConfigError(f"{self.path}: {exc.strerror}") from None
        return parse_mesh_config(text, str(self.path))

    def reload(self, apply: Callable[[dict[str, Any]], None], log: Log) -> None:
        """Apply the file if it changed; a broken one is logged and the config in force stays."""
        if not self.changed():
            return
        try:
            config, warnings = self.read()
        except MeshConfigError as exc:
            log.error("mesh config not applied; the previous one stays", error=str(exc))
            return
        for warning in warnings:
            log.warning("mesh config field ignored", detail=warning)
        apply(config)
