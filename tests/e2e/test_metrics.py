"""Every metrics endpoint of the demo mesh, scraped from the host as a Prometheus there would
(the host link `meshctl up` makes), passes `promtool check metrics`: galley, pilot, citadel, the
node agent, every agent's merged 15020 and every proxy's own 15090, before and after traffic. The
endpoints come from the mesh (`Mesh.metrics_endpoints`), checked against every process it started.
The only lint lines allowed are tests/promtool.py's KNOWN ones, and exactly where their families
have samples."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshctl.localmesh.mesh import Mesh
from tests.e2e.conftest import get_json, running_mesh
from tests.promtool import UNIT, expected, lint, scrape


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """This module's own mesh, with the host link, so that the host reaches every endpoint."""
    with running_mesh("zmesh-metrics-", host_access=True) as m:
        yield m


def without_metrics(name: str) -> bool:
    """Processes that serve no metrics: the bookinfo apps and 'the internet'."""
    return name.endswith(".app") or name == "external"


def lint_all(mesh: Mesh) -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    """Every endpoint's text, and (promtool's lines, the expected ones) where they differ."""
    texts = {name: scrape(url) for name, url in mesh.metrics_endpoints().items()}
    wrong = {}
    for name, text in texts.items():
        got, want = lint(text), expected(text)
        if got != want:
            wrong[name] = (got, want)
    return texts, wrong


def test_the_endpoints_cover_every_process_of_the_mesh(mesh: Mesh) -> None:
    urls = mesh.metrics_endpoints()
    started = {proc.name for proc in mesh.state.procs}
    assert {name for name in started if not without_metrics(name)} <= set(urls), (started, urls)
    sidecars = {name for name in started if name.endswith(".sidecar")}
    assert len(sidecars) == len(mesh.layout.pods)
    # the proxy is the agent's child, not a process of its own in the mesh's records
    assert set(urls) == (started - {n for n in started if without_metrics(n)}) | \
        {name.removesuffix(".sidecar") + ".proxy" for name in sidecars}


def test_before_traffic_every_endpoint_is_clean(mesh: Mesh) -> None:
    texts, wrong = lint_all(mesh)
    assert not wrong, wrong
    assert all(expected(text) == [] for text in texts.values())  # no request yet: nothing to warn of


def test_after_traffic_only_the_documented_warnings_remain(mesh: Mesh) -> None:
    for _ in range(3):
        status, page = get_json(mesh, "productpage", "/productpage")
        assert status == 200, page
    texts, wrong = lint_all(mesh)
    assert not wrong, wrong
    # the requests went through sleep's, productpage's and details' sidecars: each warns of the unit
    for pod in ("sleep", "productpage", "details"):
        name = mesh.pod(pod).name
        assert lint(texts[f"{name}.proxy"]) == [UNIT]
        assert lint(texts[f"{name}.sidecar"]) == [UNIT]
        # the agent's 15020 carries the proxy's series: scraping 15090 too would count them twice
        proxy_series = {line for line in texts[f"{name}.proxy"].splitlines() if line.startswith("istio_")}
        assert proxy_series and proxy_series <= set(texts[f"{name}.sidecar"].splitlines())
