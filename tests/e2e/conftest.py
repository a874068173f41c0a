"""The whole mesh on this machine (meshctl.localmesh, as `meshctl up` runs it), once per module.

Every pod is a network namespace with istio-init's rules; the apps dial service names and never
learn about the sidecars. Tests talk from inside a pod's namespace (`Mesh.http`), so their
requests take the same transparent path an app's do. Teardown always runs; a session-level
sweep first removes namespaces that a crashed earlier run (our prefix, a dead pid) left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl.localmesh import netns
from meshctl.localmesh.mesh import BOOKINFO, Mesh, MeshError
from tests.conftest import unavailable


@pytest.fixture(scope="session", autouse=True)
def sweep_stale_namespaces() -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        netns.sweep_stale()


@contextlib.contextmanager
def running_mesh(prefix: str = "zmesh-e2e-", **options: Any) -> Iterator[Mesh]:
    """A mesh (`Mesh(**options)`) up for the block; torn down after it, its namespaces checked gone."""
    if reason := netns.missing_tools():
        unavailable(reason)
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.chmod(0o755)  # sidecars running as uid 1337 read their key and certificates below it
    m = Mesh(run_dir / "run", say=lambda _msg: None, **options)
    try:
        try:
            m.up(timeout=90)
        except MeshError as exc:
            pytest.fail(f"the mesh did not come up: {exc}\n{tail_logs(m)}")
        yield m
    finally:
        m.down()
        shutil.rmtree(run_dir, ignore_errors=True)
    left = [ns for ns in os.listdir(netns.NETNS_DIR) if ns.startswith(f"{m.run_id}-")]
    assert not left, f"teardown left namespaces behind: {left}"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with running_mesh() as m:
        yield m


def tail_logs(m: Mesh, lines: int = 5) -> str:
    out = []
    for log in sorted(m.logs.glob("*.log")):
        out.append(f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


@pytest.fixture
def config(mesh: Mesh) -> Iterator[Any]:
    """`config(name, text)` puts a file into galley's directory (until the test ends) and returns
    once every proxy ACKed the change."""
    written: list[str] = []

    def put(name: str, text: str) -> None:
        mesh.apply(name, text)
        written.append(name)

    yield put
    if written:  # remove them all, then wait once for the proxies to take it
        for name in written[:-1]:
            (mesh.config_dir / name).unlink(missing_ok=True)
        mesh.apply(written[-1], None)


def sample(name: str) -> str:
    return (BOOKINFO / name).read_text()


def get_json(mesh: Mesh, service: str, path: str, headers: dict[str, str] | None = None,
             client: str = "sleep") -> tuple[int, dict[str, Any]]:
    """GET http://<service>:9080<path> from a pod's network, the way its app would dial the name."""
    vip = mesh.layout.vips[service]
    status, body = mesh.http(client, vip, 9080, path, {"Host": f"{service}:9080", **(headers or {})})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode(errors="replace")}


def versions(mesh: Mesh, service: str, path: str, n: int, headers: dict[str, str] | None = None,
             pick: tuple[str, ...] = ()) -> Counter[str]:
    """How many of `n` requests each version answered (following `pick` into the JSON)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = get_json(mesh, service, path, headers)
        for key in pick:
            body = body.get(key, {})
        seen[body.get("version", f"status {status}")] += 1
    return seen


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def scrape(mesh: Mesh, pod: str, port: int, path: str) -> str:
    status, body = mesh.http(pod, "127.0.0.1", port, path)
    assert status == 200, body
    return body.decode()
