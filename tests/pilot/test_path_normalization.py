"""meshConfig.pathNormalization: parsed by pilot, carried in every proxy's config, applied by the
proxy (which refuses a mode it does not know). The normalisation itself is tested in
tests/proxy/test_hostile_http.py."""

from __future__ import annotations

import pytest

from controlplane.pilot.meshconfig import MeshConfigError, parse_mesh_config
from dataplane.proxy.runtime import compile_snapshot
from tests.pilot.test_translation import config


@pytest.mark.parametrize(("text", "mode"), [
    ("", "BASE"),  # Istio's default
    ("pathNormalization: {}", "BASE"),
    ("pathNormalization: {normalization: DEFAULT}", "BASE"),
    ("pathNormalization: {normalization: NONE}", "NONE"),
    ("pathNormalization: {normalization: MERGE_SLASHES}", "MERGE_SLASHES"),
    ("pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}", "DECODE_AND_MERGE_SLASHES"),
])
def test_the_mesh_setting_reaches_the_proxy(text: str, mode: str) -> None:
    mesh, warnings = parse_mesh_config(text, "mesh.yaml")
    assert warnings == []
    cfg = config([], mesh=mesh)
    assert cfg["security"]["path_normalization"] == mode
    assert compile_snapshot(cfg).path_normalization == mode


@pytest.mark.parametrize("text", ["pathNormalization: {normalization: SLASHES}", "pathNormalization: BASE"])
def test_an_unknown_normalization_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(MeshConfigError, match=r"pathNormalization\.normalization must be one of"):
        parse_mesh_config(text, "mesh.yaml")
