"""`make deps` (ops/deps.sh over ops/apt-packages.txt): the list covers every command the code and
tests run, each command comes from the package listed for it, and the script installs only what is
missing (apt-get update once), does nothing the second time, and without root prints the sudo line."""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, unavailable

PACKAGES = ROOT / "ops" / "apt-packages.txt"
SCRIPT = ROOT / "ops" / "deps.sh"
SCANNED = ("bus", "controlplane", "dataplane", "nodeagent", "benchmarks", "tests")
STARTERS = {"run", "Popen", "check_output", "check_call", "start", "start_in"}  # call names that run argv
COMMAND = re.compile(r"^[a-z][a-z0-9.+_-]*$")


def listed() -> dict[str, list[str]]:
    """package -> the commands the list says it provides."""
    out: dict[str, list[str]] = {}
    for line in PACKAGES.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            out[fields[0]] = fields[1:]
    return out


def _str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _which_of(body: list[ast.stmt], var: str) -> bool:
    """Whether `body` calls shutil.which(<var>)."""
    return any(isinstance(n, ast.Call) and _name(n) == "which" and n.args and isinstance(n.args[0], ast.Name)
               and n.args[0].id == var for stmt in body for n in ast.walk(stmt))


def commands_in(source: str) -> set[str]:
    """Command names `source` runs or looks for: shutil.which("x"); ["x", ...] handed to run/Popen/
    start-like calls; run("x", ...) and exec("x", ...) helpers; and `for x in ("a", "b")` loops (or
    `for x, _ in (("a", ...), ...)`) whose body calls which(x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name, first = _name(node), node.args[0] if node.args else None
            if first is not None and name in {"which", "run", "exec"} and _str(first):
                found.add(_str(first))  # type: ignore[arg-type]
            if name in STARTERS:
                found |= {_str(a.elts[0]) for a in node.args
                          if isinstance(a, ast.List) and a.elts and _str(a.elts[0])}  # type: ignore[misc]
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple | ast.List):
            target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
            if isinstance(target, ast.Name) and _which_of(node.body, target.id):
                for elt in node.iter.elts:
                    first = elt.elts[0] if isinstance(elt, ast.Tuple) else elt
                    if _str(first):
                        found.add(_str(first))  # type: ignore[arg-type]
    return {c for c in found if COMMAND.match(c)}


def owners(path: str) -> set[str]:
    """The packages dpkg says own `path` (tried as found, resolved, and without /usr: merged /usr)."""
    real = os.path.realpath(path)
    candidates = [path, real, *(p.removeprefix("/usr") for p in (path, real) if p.startswith("/usr/"))]
    for candidate in dict.fromkeys(candidates):
        done = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return {pkg.strip().split(":")[0] for line in done.stdout.splitlines()
                    for pkg in line.rsplit(": ", 1)[0].split(",")}
    return set()


def field(package: str, name: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", f"-f=${{{name}}}", package], capture_output=True, text=True,
                          timeout=30)
    return done.stdout if done.returncode == 0 else ""


def depends(package: str) -> set[str]:
    """`package` and its direct Depends (nginx-light ships no binary; it depends on nginx, which does)."""
    deps = field(package, "Depends") + "," + field(package, "Pre-Depends")
    return {package} | {alt.strip().split()[0].split(":")[0] for clause in deps.split(",")
                        for alt in clause.split("|") if alt.strip()}


def test_the_scan_finds_commands_in_each_form() -> None:
    source = """
shutil.which("etcd")
subprocess.run(["openssl", "x509"]); procs.start(["haproxy", "-db"]); run("ip", "netns")
topo.exec("cat", "/proc/x"); client.call("echo", 1); Counter("reason", "x", ["kind"])
for tool in ("iptables-save", "setpriv"):
    shutil.which(tool)
for tool, pkg in (("wrk", "wrk"),):
    if shutil.which(tool) is None: pass
for name in ("not", "scanned"):
    print(name)
"""
    assert commands_in(source) == {"etcd", "openssl", "haproxy", "ip", "cat", "iptables-save", "setpriv",
                                   "wrk"}


def test_every_command_the_code_and_tests_run_is_in_the_list() -> None:
    provided = {cmd for cmds in listed().values() for cmd in cmds}
    used: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for cmd in commands_in(path.read_text()):
                used.setdefault(cmd, []).append(str(path.relative_to(ROOT)))
    assert {"ip", "iptables-restore", "openssl", "etcd", "setpriv"} <= set(used), used  # the scan works
    unlisted = {}
    for cmd, where in sorted(used.items()):
        if cmd in provided or cmd == "apt-get":  # apt-get: what installs the list
            continue
        found = shutil.which(cmd)
        essential = found is not None and any(field(p, "Essential") == "yes" for p in owners(found))
        if not essential:  # coreutils and the like are on every Debian system
            unlisted[cmd] = where
    assert not unlisted, f"commands run but not in {PACKAGES.name} (add their package): {unlisted}"


@pytest.mark.parametrize(("package", "command"), [(p, c) for p, cmds in listed().items() for c in cmds])
def test_each_listed_command_comes_from_its_package(package: str, command: str) -> None:
    found = shutil.which(command)
    if found is None:
        unavailable(f"{command} is not installed (`make deps` installs {package})")
    assert owners(found) & depends(package), f"{found} belongs to {owners(found)}, not to {package}"


@pytest.fixture
def fake_list() -> Iterator[Path]:
    """A list file anyone may read (uid 65534 cannot enter pytest's tmp_path), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="zmesh-deps-"))
    d.chmod(0o755)
    yield d / "apt.txt"
    shutil.rmtree(d, ignore_errors=True)


def deps(list_file: Path, packages: str | None = None, nobody: bool = False,
         path: str | None = None) -> subprocess.CompletedProcess:
    """Run ops/deps.sh over `list_file` (written from `packages` first), as uid 65534 if `nobody`."""
    if packages is not None:
        list_file.write_text(packages)
        list_file.chmod(0o644)
    env = {**os.environ, "ZMESH_APT_PACKAGES": str(list_file), "PATH": path or os.environ["PATH"]}
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if nobody else []
    script = SCRIPT
    if nobody:  # uid 65534 may not enter the checkout (/root is 0700 on Debian): run a copy beside the list
        script = list_file.parent / SCRIPT.name
        shutil.copy(SCRIPT, script)
    return subprocess.run([*as_nobody, str(script)], capture_output=True, text=True, env=env, timeout=60)


def test_not_root_prints_the_one_sudo_line_for_what_is_missing(fake_list: Path) -> None:
    nobody = os.geteuid() == 0  # as root, become uid 65534; otherwise we already are not root
    done = deps(fake_list, "coreutils  # present\nzmesh-no-such-package  # missing\nbash\nzmesh-nor-this\n",
                nobody)
    assert done.returncode == 1, done
    assert done.stdout == "sudo apt-get install -y zmesh-no-such-package zmesh-nor-this\n"
    assert "not root" in done.stderr and "missing" in done.stderr
    fine = deps(fake_list, "coreutils\nbash # both present\n", nobody)
    assert fine.returncode == 0, fine
    assert fine.stdout == f"make deps: all present (2 packages from {fake_list})\n"


def test_as_root_it_updates_once_and_installs_only_what_is_missing(fake_list: Path) -> None:
    if os.geteuid() != 0:
        unavailable("installing needs root")
    bin_dir = fake_list.parent / "bin"
    bin_dir.mkdir()
    calls = fake_list.parent / "calls"
    apt = bin_dir / "apt-get"  # a stand-in that records its calls: this test installs nothing
    apt.write_text(f'#!/bin/sh\necho "$DEBIAN_FRONTEND $*" >> {calls}\n')
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    path = f"{bin_dir}:{os.environ['PATH']}"
    done = deps(fake_list, "coreutils\nzmesh-no-such-package\n", path=path)
    assert done.returncode == 0, done
    assert calls.read_text().splitlines() == ["noninteractive update -q",  # DEBIAN_FRONTEND, then argv
                                              "noninteractive install -y -q --no-install-recommends "
                                              "zmesh-no-such-package"]
    calls.unlink()
    again = deps(fake_list, "coreutils\n", path=path)
    assert again.returncode == 0 and "all present" in again.stdout and not calls.exists(), again


def test_a_missing_or_empty_list_is_an_error(fake_list: Path) -> None:
    done = deps(fake_list, "# nothing but comments\n")
    assert done.returncode == 2 and "lists no packages" in done.stderr, done
    fake_list.unlink()
    done = deps(fake_list)
    assert done.returncode == 2 and "cannot read the package list" in done.stderr, done


def test_the_real_list_is_installed_here(fake_list: Path) -> None:
    """After `make deps` (which `make test` runs first) nothing is missing. Checked without root, so
    this test never installs anything itself."""
    done = deps(fake_list, PACKAGES.read_text(), nobody=os.geteuid() == 0)
    if done.returncode == 1:
        unavailable(f"apt packages are missing here: {done.stdout.strip()}")
    assert done.stdout == f"make deps: all present ({len(listed())} packages from {fake_list})\n", done
