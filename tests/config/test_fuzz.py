"""Fuzzing the YAML loader and validator: random documents give diagnostics, never crashes."""

from __future__ import annotations

import functools

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.config.model import SUPPORTED
from controlplane.config.validate import load_paths, load_text

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20)
FIELDS = ["hosts", "http", "route", "destination", "host", "subset", "weight", "match", "uri", "prefix",
          "timeout", "retries", "attempts", "trafficPolicy", "loadBalancer", "simple", "subsets", "labels",
          "ports", "number", "protocol", "name", "mtls", "mode", "rules", "from", "source", "selector"]
spec_like = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.sampled_from(FIELDS), children, max_size=4)),
    max_leaves=25)
API = {kind: f"{group}/{versions[0]}" if group else versions[0]
       for kind, (group, versions) in SUPPORTED.items()}


@functools.cache
def bookinfo(testdata):
    return load_paths([testdata / "bookinfo"]).resources


def check(text: str) -> None:
    result = load_text(text, "fuzz.yaml")
    for d in result.diagnostics:
        assert d.level in ("Error", "Warning", "Info") and d.code and d.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(API)), spec_like, values)
def test_random_resources_of_every_kind(kind: str, spec: object, metadata: object) -> None:
    doc = {"apiVersion": API[kind], "kind": kind, "metadata": {"name": "x", "extra": metadata}, "spec": spec}
    check(yaml.safe_dump(doc))
    doc["metadata"] = metadata
    check(yaml.safe_dump(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_bookinfo(data, istio_testdata) -> None:
    """Take a real bookinfo resource and replace one random field with random junk."""
    resources = bookinfo(istio_testdata)
    r = data.draw(st.sampled_from(resources))
    doc = yaml.safe_load(yaml.safe_dump(r.raw))
    node = doc
    for _ in range(data.draw(st.integers(1, 6))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
                node[key] = data.draw(values)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            i = data.draw(st.integers(0, len(node) - 1))
            if not isinstance(node[i], (dict, list)):
                node[i] = data.draw(values)
                break
            node = node[i]
    check(yaml.safe_dump(doc))
