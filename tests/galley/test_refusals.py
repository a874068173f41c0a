"""What galley and `meshctl apply` refuse, and how they say so: alias bombs (ZM0003), kinds zmesh
does not support (ZM0001), a resource defined twice (ZM0002). Nothing is applied; nothing in
force is lost; galley reports the refused file and keeps serving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from controlplane.config.yamlload import MAX_ALIAS_NODES
from controlplane.galley.etcd import EtcdClient
from controlplane.galley.service import STATUS_KEY, Galley
from controlplane.galley.source_dir import write_atomically
from controlplane.galley.source_etcd import EtcdSource
from meshctl.cli import cli
from tests.bus.helpers import publisher, subscriber
from tests.config.bombs import alias_bomb, at
from tests.conftest import wait_for

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts: [{name}]
  http: [{{route: [{{destination: {{host: {name}}}}}]}}]
"""
WIDGET = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"
BOMB_MESSAGE = re.compile(rf"bomb\.yaml:(\d+):(\d+)\) YAML alias expansion exceeds {MAX_ALIAS_NODES} nodes")


def applied(config: Path) -> list[Path]:
    return sorted(config.rglob("*.yaml")) if config.exists() else []


def apply(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["apply", *args])
    return result.exit_code, result.output


# `meshctl` that reports its own peak RSS (VmHWM) last on stderr. Not the parent's wait4 rusage:
# Linux carries the forked parent's (pytest's) peak RSS across exec into the child's ru_maxrss.
MESHCTL_PEAK = ("import atexit, sys\n"
                "def peak():\n"
                "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
                "    sys.stderr.write(hwm)\n"
                "atexit.register(peak)\n"
                "from meshctl.cli import main\n"
                "sys.argv[0] = 'meshctl'\n"
                "main()\n")


def test_apply_refuses_an_alias_bomb_quickly_in_a_process(tmp_path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    config = tmp_path / "config"
    argv = [sys.executable, "-c", MESHCTL_PEAK, "apply", "-f", str(bomb), "--config-dir", str(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    stderr = proc.stderr
    assert proc.returncode == 1, stderr
    found = BOMB_MESSAGE.search(stderr)
    assert found, stderr
    assert at(alias_bomb(), int(found[1]), int(found[2])).startswith("*l")
    assert "[ZM0003]" in stderr and "nothing was applied" in stderr
    peak_kib = int(re.findall(r"VmHWM:\s+(\d+) kB", stderr)[-1])
    assert peak_kib < 120 * 1024, stderr  # ~45 MiB measured, not 2.3 GB
    assert applied(config) == []


def test_apply_refuses_kinds_zmesh_does_not_support_and_applies_nothing(tmp_path) -> None:
    config = tmp_path / "config"
    unknown_group, known_but_unsupported, known_kind_in_an_unknown_group = (
        WIDGET, "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: e}\n",
        "apiVersion: example.com/v1\nkind: VirtualService\nmetadata: {name: v}\n")
    for other in (unknown_group, known_but_unsupported, known_kind_in_an_unknown_group):
        mixed = tmp_path / "mixed.yaml"
        mixed.write_text(VS.format(name="r") + "---\n" + other)
        code, output = apply("-f", str(mixed), "--config-dir", str(config))
        assert code == 1, output
        assert "Error [ZM0001]" in output and f"{mixed}:10)" in output, output
        assert "is not supported by zmesh" in output
        assert "nothing was applied" in output
        assert applied(config) == []


def test_apply_refuses_a_resource_defined_twice_and_applies_nothing(tmp_path) -> None:
    config = tmp_path / "config"
    twice = tmp_path / "twice.yaml"
    twice.write_text(VS.format(name="r") + "---\n" + VS.format(name="s") + "---\n" + VS.format(name="r"))
    code, output = apply("-f", str(twice), "--config-dir", str(config))
    assert code == 1, output
    assert f"Error [ZM0002] (VirtualService default/r {twice}:20) " \
           f"VirtualService default/r is also defined in {twice}:4; refused" in output
    assert applied(config) == []
    # the same across the files of one invocation
    other = tmp_path / "other.yaml"
    other.write_text(VS.format(name="s"))
    twice.write_text(VS.format(name="s"))
    code, output = apply("-f", str(twice), "-f", str(other), "--config-dir", str(config))
    assert code == 1 and "[ZM0002]" in output and f"also defined in {twice}:4" in output, output
    assert applied(config) == []


def test_apply_points_at_the_file_that_already_defines_a_resource(tmp_path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "hand.yaml").write_text(VS.format(name="r"))
    new = tmp_path / "new.yaml"
    new.write_text(VS.format(name="r"))
    code, output = apply("-f", str(new), "--config-dir", str(config))
    assert code == 1, output
    assert "VirtualService default/r is also defined in hand.yaml:4; edit it there" in output
    assert applied(config) == [config / "hand.yaml"]


def test_galley_reports_refused_files_and_keeps_serving(tmp_path, galley_process) -> None:
    config = tmp_path / "config"
    config.mkdir()
    write_atomically(config / "a.yaml", VS.format(name="a"))
    write_atomically(config / "b.yaml", VS.format(name="b"))
    galley = galley_process(config)
    sub = galley.sub
    assert wait_for(lambda: sub.get("galley/VirtualService/default/b") is not None, timeout=10)

    write_atomically(config / "bomb.yaml", alias_bomb())                # new: never valid
    write_atomically(config / "b.yaml", alias_bomb())                   # was valid: that version stays
    write_atomically(config / "dup.yaml", VS.format(name="d") + "---\n" + VS.format(name="d"))
    want = ["b.yaml", "bomb.yaml", "dup.yaml"]
    assert wait_for(lambda: (sub.get(STATUS_KEY) or {}).get("rejected") == want, timeout=10), \
        sub.get(STATUS_KEY)
    errors = {(d["file"], d["code"]) for d in sub.get(STATUS_KEY)["diagnostics"] if d["level"] == "Error"}
    assert errors == {("b.yaml", "ZM0003"), ("bomb.yaml", "ZM0003"), ("dup.yaml", "ZM0002")}
    [bomb] = [d for d in sub.get(STATUS_KEY)["diagnostics"] if d["file"] == "bomb.yaml"]
    assert at(alias_bomb(), bomb["line"], bomb["column"]).startswith("*l")
    assert "alias bomb" in bomb["message"]
    assert sub.get("galley/VirtualService/default/a") is not None
    assert sub.get("galley/VirtualService/default/b") is not None       # its last valid version
    assert sub.get("galley/VirtualService/default/d") is None           # defined twice: not applied

    write_atomically(config / "c.yaml", VS.format(name="c"))            # galley still answers
    assert wait_for(lambda: sub.get("galley/VirtualService/default/c") is not None, timeout=10)
    metrics = galley.metrics()
    assert 'zmesh_galley_rejections_total{reason="ConfigTooLarge"} 2.0' in metrics
    assert 'zmesh_galley_rejections_total{reason="DuplicateResource"} 1.0' in metrics
    assert "zmesh_galley_rejected_units 3.0" in metrics
    assert galley.peak_rss_kib() < 300 * 1024  # the report's galley reached 1.97 GB

    result = CliRunner().invoke(cli, ["get", "vs", "--config-dir", str(config)])
    assert result.exit_code == 0
    assert "rejected: Error [ZM0003] (VirtualService default/bomb bomb.yaml:" not in result.output
    assert re.search(r"rejected: Error \[ZM0003\] \(bomb\.yaml:\d+:\d+\)", result.output), result.output
    assert "rejected: Error [ZM0002] (VirtualService default/d dup.yaml:12)" in result.output

    write_atomically(config / "b.yaml", VS.format(name="b2"))           # fixed: rejected no more
    assert wait_for(lambda: sub.get(STATUS_KEY)["rejected"] == ["bomb.yaml", "dup.yaml"], timeout=10)
    assert wait_for(lambda: sub.get("galley/VirtualService/default/b") is None, timeout=10)
    log = galley.stop()
    assert "handler failed" not in log and "Traceback" not in log
    assert "invalid config; last valid version stays in force" in log


def test_galley_reports_a_refused_etcd_key(etcd, keydir, loops) -> None:
    client = EtcdClient(etcd.endpoint)
    client.put("/cfg/a", VS.format(name="a"))
    client.put("/cfg/bomb", alias_bomb())
    client.put("/cfg/also-a", VS.format(name="a"))  # a resource key /cfg/a holds already
    loop = loops("galley")
    pub = publisher(loop, keydir)
    galley = Galley(loop, pub)
    source = EtcdSource(loop, etcd.endpoint, "/cfg/", galley.on_unit)
    source.start()
    sub = subscriber(loops("sub"), keydir, pub, prefix="galley/")
    try:
        assert wait_for(lambda: (sub.get(STATUS_KEY) or {}).get("rejected") == ["/cfg/also-a", "/cfg/bomb"],
                        timeout=10), sub.get(STATUS_KEY)
        codes = {(d["file"], d["code"]) for d in sub.get(STATUS_KEY)["diagnostics"]}
        assert codes == {("/cfg/bomb", "ZM0003"), ("/cfg/also-a", "ZM0002")}
        assert sub.get("galley/VirtualService/default/a") is not None
    finally:
        source.stop()
