"""The loader's bounds: alias bombs, deep nesting and huge files are refused with file:line:column,
before they cost memory; anchors used as real config uses them still load."""

from __future__ import annotations

import tracemalloc

import pytest

from controlplane.config.diagnostics import ConfigError
from controlplane.config.validate import load_text
from controlplane.config.yamlload import (
    LIMIT_CODE,
    MAX_ALIAS_CHARS,
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    MAX_FILE_CHARS,
    load_documents,
)
from tests.config.bombs import alias_bomb, at, deep_nesting


def refusal(text: str, file: str = "x.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_documents(text, file)
    return info.value


def test_the_9x9_alias_bomb_is_refused_at_its_alias_in_little_memory() -> None:
    bomb = alias_bomb()
    assert len(bomb) < 1000
    tracemalloc.start()
    try:
        d = refusal(bomb, "bookinfo.yaml").diagnostic
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (d.code, d.name, d.level) == (*LIMIT_CODE, "Error")
    assert d.message == f"YAML alias expansion exceeds {MAX_ALIAS_NODES} nodes (alias bomb?)"
    # levels 1-3 add 90 + 819 + 7,380 nodes; the first alias of level 4 adds 7,381 more
    assert at(bomb, d.line, d.column).startswith("*l3, ")
    assert f"(bookinfo.yaml:{d.line}:{d.column}) YAML alias expansion" in str(d)
    assert peak < 5 * 1024 * 1024, peak  # composing shares aliased nodes; nothing was expanded


def test_the_bomb_refuses_the_file_through_validation() -> None:
    [d] = load_text(alias_bomb(), "bomb.yaml").diagnostics
    assert d.code == LIMIT_CODE[0] and d.file == "bomb.yaml" and d.line > 0 and d.column > 0


def test_one_long_string_aliased_many_times_is_refused() -> None:
    """The "quadratic" variant: few nodes, but each alias repeats a long scalar."""
    text = "s: &s " + "x" * 100_000 + "\nl: [" + ", ".join(["*s"] * 20) + "]\n"
    d = refusal(text).diagnostic
    assert d.message == f"YAML alias expansion exceeds {MAX_ALIAS_CHARS} characters (alias bomb?)"
    assert at(text, d.line, d.column).startswith("*s")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    d = refusal("a: &a [1, *a]\n").diagnostic
    assert (d.code, d.line, d.column) == (LIMIT_CODE[0], 1, 11)
    assert d.message == "YAML alias *a is inside its own anchor"


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 600, 2000])  # 2,000: past libyaml's own bound
def test_deep_nesting_is_refused_with_its_line(depth: int, flow: bool) -> None:
    d = refusal(deep_nesting(depth, flow)).diagnostic
    assert (d.code, d.level) == (LIMIT_CODE[0], "Error")
    assert d.message == f"YAML nested deeper than {MAX_DEPTH} levels"
    assert d.line > 0 and d.column > 0


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
def test_nesting_up_to_the_bound_loads(flow: bool) -> None:
    [doc] = load_documents(deep_nesting(MAX_DEPTH, flow))
    depth, value = 0, doc.data
    while isinstance(value, list):
        depth, value = depth + 1, value[0] if value else None
    assert depth == MAX_DEPTH


def test_a_file_past_the_size_bound_is_refused() -> None:
    d = refusal("a: " + "x" * MAX_FILE_CHARS + "\n").diagnostic
    assert d.code == LIMIT_CODE[0] and f"exceeds {MAX_FILE_CHARS} characters" in d.message


def test_anchors_as_config_uses_them_still_load() -> None:
    text = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy: &tp
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100}}
  subsets:
""" + "".join(f"  - name: v{i}\n    labels: {{version: v{i}}}\n    trafficPolicy: *tp\n" for i in range(50))
    result = load_text(text, "dr.yaml")
    assert result.errors == []
    [dr] = result.resources
    assert [s["trafficPolicy"]["connectionPool"] for s in dr.spec["subsets"]] == \
        [{"tcp": {"maxConnections": 100}}] * 50
    merged = load_documents("base: &b {x: 1, y: 2}\nderived: {<<: *b, y: 3}\n")[0].data
    assert merged["derived"] == {"x": 1, "y": 3}  # a merge's keys yield to the mapping's own
    assert "duplicate key 'y'" in refusal("b: &b {x: 1}\nd: {<<: *b, y: 1, y: 2}\n").diagnostic.message


def test_each_document_has_its_own_anchors() -> None:
    d = refusal("a: &a [1]\n---\nb: *a\n").diagnostic
    assert d.line == 3 and "undefined alias" in d.message
    docs = load_documents("a: &a [1]\n---\nb: &a [2]\nc: *a\n")
    assert docs[1].data == {"b": [2], "c": [2]}


def test_an_unsupported_kind_warns_and_is_an_error_when_strict() -> None:
    text = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"
    [lenient] = load_text(text, "w.yaml").diagnostics
    [strict] = load_text(text, "w.yaml", strict=True).diagnostics
    assert (lenient.code, lenient.level) == ("ZM0001", "Warning") and lenient.message.endswith("; ignored")
    assert (strict.code, strict.level, strict.line) == ("ZM0001", "Error", 2)
    assert strict.message == "example.com/v1 Widget is not supported by zmesh yet"
