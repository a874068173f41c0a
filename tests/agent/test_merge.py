"""Merging agent, proxy and app metrics into one exposition that Prometheus accepts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.agent.merge import merge_expositions

PROXY = """# HELP istio_requests_total Requests
# TYPE istio_requests_total counter
istio_requests_total{response_code="200",destination_service="a b"} 3
istio_requests_total{response_code="503",destination_service="a b"} 1
# HELP process_open_fds Open fds
# TYPE process_open_fds gauge
process_open_fds 12
"""
APP = """# HELP process_open_fds Open fds of the app
# TYPE process_open_fds gauge
process_open_fds 40
# HELP app_orders_total Orders
# TYPE app_orders_total counter
app_orders_total 7
# HELP istio_requests_total Also declared by the app, as a gauge
# TYPE istio_requests_total gauge
istio_requests_total 99
untyped_thing{x="1"} 2
"""


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"{fam.name} declared twice"
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def test_each_family_is_declared_once_and_the_first_source_wins() -> None:
    text = merge_expositions([PROXY, APP])
    assert text.count("# TYPE process_open_fds") == 1 and text.count("# HELP process_open_fds") == 1
    assert "# HELP process_open_fds Open fds\n" in text
    fams = families(text)
    assert fams["process_open_fds"] == [("process_open_fds", {}, 12.0)]  # same series: first kept
    assert fams["app_orders"] == [("app_orders_total", {}, 7.0)]
    assert fams["untyped_thing"] == [("untyped_thing", {"x": "1"}, 2.0)]
    # the app's gauge of the same name would not parse under the proxy's counter: dropped
    assert sorted(s[1]["response_code"] for s in fams["istio_requests"]) == ["200", "503"]


def test_samples_of_one_family_from_several_sources_end_up_together() -> None:
    a = "# TYPE hits_total counter\nhits_total{src=\"a\"} 1\n# TYPE other gauge\nother 1\n"
    b = "# TYPE hits_total counter\nhits_total{src=\"b\"} 2\n"
    lines = merge_expositions([a, b]).splitlines()
    assert lines[:3] == ["# TYPE hits_total counter", 'hits_total{src="a"} 1', 'hits_total{src="b"} 2']
    assert families("\n".join(lines))["hits"] == [("hits_total", {"src": "a"}, 1.0),
                                                   ("hits_total", {"src": "b"}, 2.0)]


def test_prometheus_client_output_survives_the_merge() -> None:
    registry = CollectorRegistry()
    Counter("zmesh_agent_proxy_restarts_total", "restarts", registry=registry).inc(2)
    own = generate_latest(registry).decode()  # counters come with a _created gauge family
    fams = families(merge_expositions([own, PROXY, own]))
    assert fams["zmesh_agent_proxy_restarts"] == [("zmesh_agent_proxy_restarts_total", {}, 2.0)]
    assert len(fams["zmesh_agent_proxy_restarts_created"]) == 1
    assert "istio_requests" in fams


def test_nothing_in_nothing_out() -> None:
    assert merge_expositions([]) == ""
    assert merge_expositions(["", "\n"]) == ""
