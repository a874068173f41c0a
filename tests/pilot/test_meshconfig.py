"""MeshConfig: parsing with precise errors, and a changed file reaching every proxy's config."""

from __future__ import annotations

import logging
import os

import pytest
from click.testing import CliRunner

from bus.logs import Log
from controlplane.pilot.cli import pilot_command
from controlplane.pilot.meshconfig import MeshConfigError, MeshConfigFile, parse_mesh_config
from tests.conftest import wait_for
from tests.pilot.test_pilot_service import mesh  # noqa: F401  (the fixture)


def test_the_fields_pilot_uses_are_checked_and_the_rest_named_in_warnings() -> None:
    config, warnings = parse_mesh_config(
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\ntrustDomain: example.org\nconnectTimeout: 2s\n"
        "enableAutoMtls: false\naccessLogFile: /dev/stdout\n", "mesh.yaml")
    assert config == {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}, "trustDomain": "example.org",
                      "connectTimeout": "2s", "enableAutoMtls": False}
    assert warnings == ["mesh.yaml: accessLogFile is not supported by zmesh and is ignored"]
    assert parse_mesh_config("", "m") == ({}, [])
    default = {"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}
    assert parse_mesh_config("outboundTrafficPolicy: {}\n", "m")[0] == default


@pytest.mark.parametrize(("text", "message"), [
    ("outboundTrafficPolicy: {mode: DENY_ALL}", "outboundTrafficPolicy.mode must be one of ALLOW_ANY, "
                                                "REGISTRY_ONLY, got 'DENY_ALL'"),
    ("outboundTrafficPolicy: REGISTRY_ONLY", "outboundTrafficPolicy.mode must be one of"),
    ("connectTimeout: soon", "connectTimeout must be a positive duration such as 10s, got 'soon'"),
    ("enableAutoMtls: maybe", "enableAutoMtls must be true or false"),
    ("trustDomain: ''", "trustDomain must be a non-empty string"),
    ("- a\n- b", "must be a mapping of MeshConfig fields, got list"),
    ("a: [unclosed", "not YAML"),
])
def test_bad_mesh_configs_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(MeshConfigError) as err:
        parse_mesh_config(text, "mesh.yaml")
    assert str(err.value).startswith("mesh.yaml: ") and message in str(err.value)


def test_the_file_is_reread_only_when_it_changed_and_a_broken_one_keeps_the_old(tmp_path, caplog) -> None:
    path = tmp_path / "mesh"
    path.write_text("outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    applied: list[dict] = []
    watch = MeshConfigFile(path)
    log = Log("pilot")
    watch.reload(applied.append, log)
    watch.reload(applied.append, log)
    assert applied == [{"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}]
    tmp = tmp_path / "mesh.tmp"
    tmp.write_text("outboundTrafficPolicy: {mode: NOPE}\n")
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="zmesh.pilot"):
        watch.reload(applied.append, log)
    assert len(applied) == 1
    [record] = [r for r in caplog.records if r.getMessage().startswith("mesh config not applied")]
    assert "got 'NOPE'" in record.fields["error"]


def test_pilot_refuses_to_start_on_a_bad_mesh_config(tmp_path, keydir) -> None:
    bad = tmp_path / "mesh"
    bad.write_text("connectTimeout: -1s\n")
    result = CliRunner().invoke(pilot_command, ["--keys", str(keydir), "--mesh-config", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}: connectTimeout must be a positive duration" in result.output


def test_a_mesh_config_change_reaches_every_proxy(mesh) -> None:  # noqa: F811
    p = mesh.proxy("productpage-1", {"app": "productpage", "version": "v1"}, "10.0.0.1")
    assert wait_for(lambda: p.applied, timeout=10)
    assert p.applied_config["listeners"]["outbound_traffic_policy"] == "ALLOW_ANY"
    before = p.applied
    registry_only = {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}
    mesh.loop.call_sync(lambda: mesh.pilot.set_mesh_config(registry_only))
    assert wait_for(lambda: p.applied != before, timeout=10)
    assert p.applied_config["listeners"]["outbound_traffic_policy"] == "REGISTRY_ONLY"
