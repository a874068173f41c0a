"""The agent's merged 15020 (its own, the proxy's and the app's metrics) is one exposition that
`promtool check metrics` accepts: each family declared once, whatever the sources repeat or
contradict. Sans-IO merges of hostile sources, and a real agent + proxy + app before and after
traffic; lint lines are asserted exactly (tests/promtool.py)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from dataplane.agent.merge import merge_expositions
from dataplane.proxy.stats import ENVOY_COUNTERS, HELP
from tests.agent.test_agent import _cleanup, app_metrics, meshctl, status
from tests.agent.test_merge import APP, PROXY
from tests.conftest import free_port, wait_for
from tests.promtool import UNIT, lint, scrape
from tests.proxy.l7helpers import Backend
from tests.proxy.test_exposition import declared, get_svc, http_config

HISTOGRAM = """# HELP hist_seconds A histogram
# TYPE hist_seconds histogram
hist_seconds_bucket{le="1"} 1
hist_seconds_bucket{le="+Inf"} 1
hist_seconds_sum 0.5
hist_seconds_count 1
"""
# the same family again: undeclared samples of it, then a second HELP and another TYPE; a series twice
CONTRADICTING = """hist_seconds_bucket{le="1"} 7
hist_seconds_count 3
# HELP hist_seconds again
# TYPE hist_seconds counter
hist_seconds 4
loose_total 1
loose_total{} 2
"""


def test_sources_that_repeat_or_contradict_merge_into_one_valid_exposition() -> None:
    text = merge_expositions([PROXY, APP])
    assert lint(text) == ["untyped_thing no help text"]  # the app's own omission, passed on
    text = merge_expositions([HISTOGRAM, CONTRADICTING])
    assert text.count("# HELP hist_seconds ") == text.count("# TYPE hist_seconds ") == 1
    assert "hist_seconds_count 1\n" in text and "hist_seconds 4" not in text and "_count 3" not in text
    assert "\nloose_total 1\n" in text and "loose_total 2" not in text  # `x{}` is `x`: kept once
    assert lint(text) == ["loose_total no help text"]


APP_TEXT = (generate_latest(REGISTRY).decode()  # an app on prometheus_client: process_*, python_*
            # and, to be merged away, a family of the agent's and one of the proxy's, typed otherwise
            + "# HELP zmesh_agent_proxy_up The app's own\n# TYPE zmesh_agent_proxy_up counter\n"
              "zmesh_agent_proxy_up 5\n"
              "# HELP istio_requests_total Requests\n# TYPE istio_requests_total gauge\n"
              "istio_requests_total 3\n"
              "# HELP app_orders_total Orders\n# TYPE app_orders_total counter\napp_orders_total 7\n")


@pytest.fixture
def app() -> Iterator[str]:
    with app_metrics(APP_TEXT) as url:
        yield url


def test_the_agent_serves_one_valid_exposition_before_and_after_traffic(tmp_path: Path, app: str) -> None:
    backend = Backend()
    health, metrics, admin, stats, port = (free_port() for _ in range(5))
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(http_config(port, backend.port)))
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen(
            [*meshctl("agent"), "--health-port", str(health), "--metrics-port", str(metrics),
             "--proxy-admin-port", str(admin), "--proxy-stats-port", str(stats), "--app-metrics", app,
             "--proxy-uid", str(os.getuid()), "--proxy-gid", str(os.getgid()),
             "--termination-drain-duration", "0.5",
             "--", "--id", "client-1", "--labels", "app=client,version=v1", "--config", str(config),
             "--mode", "explicit", "--workers", "1", "--no-access-log"], stderr=log)
    try:
        assert wait_for(lambda: status(f"http://127.0.0.1:{health}/healthz/ready") == 200, timeout=20), \
            (tmp_path / "agent.log").read_text()
        before = scrape(f"http://127.0.0.1:{metrics}/stats/prometheus")
        assert declared(before) >= {*HELP, *ENVOY_COUNTERS, "zmesh_agent_proxy_up", "app_orders_total",
                                    "process_cpu_seconds_total"}
        assert lint(before) == []
        assert "zmesh_agent_proxy_up 1.0\n" in before and "zmesh_agent_proxy_up 5" not in before
        assert "istio_requests_total 3" not in before  # the app's gauge: not under the proxy's counter

        assert get_svc(port) == b"backend"
        after = scrape(f"http://127.0.0.1:{metrics}/metrics")
        assert "istio_request_duration_milliseconds_count{" in after
        assert lint(after) == [UNIT]
    finally:
        _cleanup(agent)
        backend.close()
