"""Galley over a watched directory, publishing to a real bus subscriber."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bus.loop import Loop
from controlplane.galley.service import STATUS_KEY, Galley
from controlplane.galley.source_dir import DirectorySource, write_atomically
from tests.bus.helpers import publisher, subscriber
from tests.conftest import metric, wait_for

VS = """apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {w1}
    - destination: {{host: reviews, subset: v2}}
      weight: {w2}
"""
KEY = "galley/VirtualService/default/reviews"


def weights(sub) -> list[int] | None:
    value = sub.get(KEY)
    return None if value is None else [r["weight"] for r in value["spec"]["http"][0]["route"]]


@pytest.fixture(params=["inotify", "poll"])
def mesh(request, keydir, loops, tmp_path):
    """A config dir, a galley watching it, and a subscriber to everything galley publishes."""
    loop: Loop = loops("galley")
    pub = publisher(loop, keydir)
    galley = Galley(loop, pub, debounce=0.02)
    config = tmp_path / "config"
    config.mkdir()
    source = loop.call_sync(lambda: DirectorySource(loop, config, galley.on_unit, poll_interval=0.1,
                                                    use_inotify=request.param == "inotify"))
    assert source.mode == request.param
    loop.call_sync(source.start)
    sub = subscriber(loops("sub"), keydir, pub, prefix="galley/")
    assert sub.wait_ready(5)
    return config, galley, sub


def test_edits_renames_and_invalid_saves(mesh, istio_testdata) -> None:
    config, galley, sub = mesh
    vs = config / "reviews.yaml"
    write_atomically(vs, VS.format(w1=80, w2=20))
    assert wait_for(lambda: weights(sub) == [80, 20], timeout=5)

    vs.write_text(VS.format(w1=50, w2=50))  # an in-place save
    assert wait_for(lambda: weights(sub) == [50, 50], timeout=5)

    before = metric("zmesh_galley_validation_errors_total", code="IST0106")
    vs.write_text(VS.format(w1=50, w2=60))  # invalid: weights sum to 110
    assert wait_for(lambda: galley.store.rejected_units() == ["reviews.yaml"], timeout=5)
    assert wait_for(lambda: (sub.get(STATUS_KEY) or {}).get("rejected") == ["reviews.yaml"], timeout=5)
    assert weights(sub) == [50, 50]  # the last valid version stays in force
    assert metric("zmesh_galley_validation_errors_total", code="IST0106") > before
    diags = sub.get(STATUS_KEY)["diagnostics"]
    assert any(d["file"] == "reviews.yaml" and d["line"] > 0 for d in diags)

    vs.write_text("kind: [unclosed\n")  # not even YAML
    assert wait_for(lambda: any("invalid YAML" in d["message"]
                                for d in (sub.get(STATUS_KEY) or {}).get("diagnostics", [])), timeout=5)
    assert weights(sub) == [50, 50]

    # editor style: write a temp file, rename it over the original
    tmp = config / ".reviews.yaml.swp"
    tmp.write_text(VS.format(w1=10, w2=90))
    os.replace(tmp, vs)
    assert wait_for(lambda: weights(sub) == [10, 90], timeout=5)
    assert wait_for(lambda: sub.get(STATUS_KEY)["rejected"] == [], timeout=5)

    # a rename keeps the resource; removing the file removes it
    os.rename(vs, config / "renamed.yaml")
    assert wait_for(lambda: "renamed.yaml" in galley.store.units and "reviews.yaml" not in galley.store.units,
                    timeout=5)
    assert weights(sub) == [10, 90]
    (config / "renamed.yaml").unlink()
    assert wait_for(lambda: sub.get(KEY) is None, timeout=5)

    # a whole directory of bookinfo arrives at once
    shutil.copytree(istio_testdata / "bookinfo", config / "bookinfo")
    assert wait_for(lambda: sub.get("galley/Service/default/productpage") is not None, timeout=5)
    assert wait_for(lambda: sub.get("galley/DestinationRule/default/reviews") is not None, timeout=5)


def test_version_is_a_content_hash(mesh) -> None:
    config, galley, sub = mesh
    write_atomically(config / "a.yaml", VS.format(w1=80, w2=20))
    assert wait_for(lambda: weights(sub) == [80, 20], timeout=5)
    first = galley.published_version
    write_atomically(config / "a.yaml", VS.format(w1=70, w2=30))
    assert wait_for(lambda: weights(sub) == [70, 30], timeout=5)
    assert galley.published_version != first
    write_atomically(config / "a.yaml", VS.format(w1=80, w2=20))
    assert wait_for(lambda: weights(sub) == [80, 20], timeout=5)
    assert wait_for(lambda: galley.published_version == first, timeout=5)


def test_a_burst_of_edits_is_one_publish(keydir, loops, tmp_path) -> None:
    loop = loops("galley")
    pub = publisher(loop, keydir)
    galley = Galley(loop, pub, debounce=0.2)
    config = tmp_path / "c"
    source = loop.call_sync(lambda: DirectorySource(loop, config, galley.on_unit))
    loop.call_sync(source.start)
    assert wait_for(lambda: galley.publishes == 0 and not galley._dirty, timeout=1)
    for i in range(20):
        write_atomically(config / f"vs{i}.yaml", VS.format(w1=80, w2=20).replace("reviews\n", f"r{i}\n", 1))
    assert wait_for(lambda: len(galley.store.snapshot) == 20, timeout=5)
    assert wait_for(lambda: galley.publishes >= 1, timeout=5)
    assert galley.publishes <= 2
    assert Path(config).exists()
