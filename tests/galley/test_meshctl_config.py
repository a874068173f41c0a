"""meshctl apply / get against both sources, and `meshctl galley` as a real process."""

from __future__ import annotations

import json

from click.testing import CliRunner

from meshctl.cli import cli
from tests.conftest import wait_for

BAD_DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    bogus: 1
"""


def test_apply_then_get_from_a_directory(tmp_path, istio_testdata) -> None:
    config = tmp_path / "config"
    runner = CliRunner()
    dr = istio_testdata / "bookinfo" / "destination-rule-all.yaml"
    result = runner.invoke(cli, ["apply", "-f", str(dr), "--config-dir", str(config)])
    assert result.exit_code == 0, result.output
    assert "destinationrule/reviews (default) applied" in result.output
    result = runner.invoke(cli, ["get", "dr", "reviews", "--config-dir", str(config), "-o", "json"])
    assert result.exit_code == 0, result.output
    [dr] = json.loads(result.output)
    assert [s["name"] for s in dr["spec"]["subsets"]] == ["v1", "v2", "v3"]
    result = runner.invoke(cli, ["get", "virtualservices", "--config-dir", str(config)])
    assert result.exit_code == 0 and "reviews" not in result.output
    result = runner.invoke(cli, ["get", "dr", "nope", "--config-dir", str(config)])
    assert result.exit_code == 1 and "not found" in result.output


def test_apply_refuses_invalid_input_and_writes_nothing(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_DR)
    config = tmp_path / "config"
    result = CliRunner().invoke(cli, ["apply", "-f", str(bad), "--config-dir", str(config)])
    assert result.exit_code == 1
    assert "spec.trafficPolicy.bogus: unknown field 'bogus'" in result.output
    assert f"{bad}:8" in result.output
    assert "nothing was applied" in result.output
    assert not config.exists() or not any(config.rglob("*.yaml"))


def test_apply_and_get_through_etcd(etcd, tmp_path, istio_testdata) -> None:
    runner = CliRunner()
    args = ["--etcd", etcd.endpoint, "--etcd-prefix", "/mesh/"]
    gateway = istio_testdata / "bookinfo" / "bookinfo-gateway.yaml"
    result = runner.invoke(cli, ["apply", "-f", str(gateway), *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["get", "gateway", *args, "-o", "yaml"])
    assert result.exit_code == 0 and "bookinfo-gateway" in result.output


def test_galley_process_publishes_what_is_applied(tmp_path, galley_process) -> None:
    config = tmp_path / "config"
    galley = galley_process(config)
    vs = tmp_path / "vs.yaml"
    vs.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
                  "spec: {hosts: [r], http: [{route: [{destination: {host: r}}]}]}\n")
    result = CliRunner().invoke(cli, ["apply", "-f", str(vs), "--config-dir", str(config)])
    assert result.exit_code == 0, result.output
    assert wait_for(lambda: galley.sub.get("galley/VirtualService/default/r") is not None, timeout=10)
    assert 'zmesh_galley_resources{kind="VirtualService"} 1.0' in galley.metrics()
