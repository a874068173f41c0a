"""The config as parts (sans-IO): split/assemble round trips, deltas between versions, and
the proxy-side Assembler's rules for when a set of parts is a whole config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.pilot.networking import ProxyParts, build_proxy_config, build_proxy_parts, config_hash
from meshapi.parts import MANIFEST, Assembler, PartSet, assemble, split
from tests.pilot.test_translation import files, proxy, push_of

REVIEWS_80_20 = "bookinfo/virtual-service-reviews-80-20.yaml"
DR_ALL = "bookinfo/destination-rule-all.yaml"


def bookinfo_parts(istio_testdata: Path, *extra: str, **proxy_kw: Any) -> ProxyParts:
    res = files(istio_testdata / DR_ALL, *(istio_testdata / e for e in extra))
    return build_proxy_parts(push_of(res), proxy(**proxy_kw))


def feed(assembler: Assembler, parts: ProxyParts, *, manifests: bool = True) -> None:
    for suffix, value in parts.shared.values.items():
        assembler.shared_change(suffix, value)
    for suffix, value in parts.local.values.items():
        assembler.local_change(suffix, value)
    if manifests:
        shared = {"version": parts.shared.version, "parts": len(parts.shared.values)}
        assembler.shared_change(MANIFEST, shared)
        assembler.local_change(MANIFEST, {"version": parts.version, "parts": len(parts.local.values),
                                          "scope": parts.scope, "scope_version": parts.shared.version})


def test_split_and_assemble_are_inverse_and_the_version_hashes_the_parts(istio_testdata) -> None:
    parts = bookinfo_parts(istio_testdata, REVIEWS_80_20)
    whole = parts.config()
    assert whole["version"] == parts.version == config_hash(whole)
    shared, local = split(whole)
    assert shared.keys() == parts.shared.values.keys() and local.keys() == parts.local.values.keys()
    assert assemble(shared, local, parts.version) == whole
    assert {k.split("/")[0] for k in shared} == {"policy", "lo", "r", "v", "c", "e"}
    assert {k.split("/")[0] for k in local} <= {"security", "li", "ci", "ei"}


def test_an_edit_changes_one_virtual_host_and_reuses_the_rest(istio_testdata) -> None:
    before = bookinfo_parts(istio_testdata)
    res = files(istio_testdata / DR_ALL, istio_testdata / REVIEWS_80_20)
    after = build_proxy_parts(push_of(res), proxy(), {before.scope: before.shared})
    changed, removed = after.shared.changes(before.shared)
    assert changed == ["v/9080/reviews.default.svc.cluster.local:9080"] and removed == []
    assert after.local.changes(before.local) == ([], [])
    assert after.version != before.version and after.local.version == before.local.version
    # unchanged parts are the previous push's objects: one copy in memory across versions
    assert after.shared.values["c/outbound|9080|v1|reviews.default.svc.cluster.local"] is \
        before.shared.values["c/outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert PartSet.of(dict(after.shared.values)).version == after.shared.version


def test_proxies_of_one_namespace_share_the_shared_set(istio_testdata) -> None:
    res = files(istio_testdata / DR_ALL)
    push = push_of(res)
    a = build_proxy_parts(push, proxy("productpage", ip="10.1.3.1"))
    b = build_proxy_parts(push, proxy("reviews", "v2", ip="10.1.2.2"))
    assert a.scope == b.scope and a.shared is b.shared
    assert a.local.version != b.local.version  # each serves its own inbound ports


def test_the_assembler_waits_for_a_consistent_set(istio_testdata) -> None:
    parts = bookinfo_parts(istio_testdata)
    a = Assembler()
    assert a.pending() == "no group manifest" and a.config() is None
    feed(a, parts, manifests=False)
    a.local_change(MANIFEST, {"version": parts.version, "parts": len(parts.local.values),
                              "scope": parts.scope, "scope_version": parts.shared.version})
    assert a.scope == parts.scope and a.pending() == "no scope manifest"
    a.shared_change(MANIFEST, {"version": "an older scope version", "parts": len(parts.shared.values)})
    assert a.pending() == "scope and group manifests disagree"
    a.shared_change(MANIFEST, {"version": parts.shared.version, "parts": len(parts.shared.values) + 1})
    assert a.pending() == "parts missing"
    a.shared_change(MANIFEST, {"version": parts.shared.version, "parts": len(parts.shared.values)})
    assert a.pending() is None
    assert a.config() == parts.config()
    assert len(a.take_touched()) == len(parts.shared.values) + len(parts.local.values)
    assert a.take_touched() == set()


def test_the_assembler_follows_deltas_and_refuses_parts_that_do_not_fit(istio_testdata) -> None:
    before = bookinfo_parts(istio_testdata)
    after = bookinfo_parts(istio_testdata, REVIEWS_80_20)
    a = Assembler()
    feed(a, before)
    a.take_touched()
    changed, _ = after.shared.changes(before.shared)
    for suffix in changed:
        a.shared_change(suffix, after.shared.values[suffix])
    feed(a, after, manifests=True)  # re-feeding equal parts changes nothing but the manifests
    assert a.config() == after.config()
    assert "o:v/9080/reviews.default.svc.cluster.local:9080" in a.take_touched()

    # a route config naming a virtual host nobody sent, with the counts still right
    a.shared_change("r/9080", {"name": "9080", "virtual_hosts": ["ghost:9080"]})
    with pytest.raises(ValueError, match="do not fit"):
        a.config()


def test_build_proxy_config_is_the_assembled_parts(istio_testdata) -> None:
    res = files(istio_testdata / DR_ALL)
    push = push_of(res)
    assert build_proxy_config(push, proxy()) == build_proxy_parts(push, proxy()).config()
