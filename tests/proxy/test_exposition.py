"""The proxy's Prometheus exposition passes `promtool check metrics`: sans-IO with every family
filled, and from a real `meshctl proxy` on 15090 before and after traffic. The only lines left are
the documented exceptions (tests/promtool.py KNOWN), asserted exactly."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from dataplane.proxy.stats import DESTINATION, ENVOY_COUNTERS, HELP, SOURCE, TCP, Stats, Workload
from tests.conftest import free_port, wait_for
from tests.promtool import KNOWN, UNIT, lint, scrape
from tests.proxy.l7helpers import CLUSTER, Backend, endpoint, make_config
from tests.proxy.test_sidecar import Proxy

CLIENT = Workload("client-v1", "default", "spiffe://cluster.local/ns/default/sa/client", "client", "v1",
                  "client", "v1", "Kubernetes")
SERVER = Workload("server-v1", "default", "spiffe://cluster.local/ns/default/sa/server", "server", "v1",
                  "server", "v1", "Kubernetes")


def declared(text: str) -> set[str]:
    """Families with both a HELP and a TYPE line."""
    lines = text.splitlines()
    helped = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    return helped & {line.split()[2] for line in lines if line.startswith("# TYPE ")}


def test_a_proxy_without_traffic_declares_every_family_and_promtool_is_clean() -> None:
    text = Stats(CLIENT).render()
    assert declared(text) == {*HELP, *ENVOY_COUNTERS}
    assert lint(text) == []


def test_every_family_filled_leaves_only_the_known_lint_lines() -> None:
    stats = Stats(CLIENT)
    key = stats.request_key(SOURCE, SERVER, service_host="server.default.svc.cluster.local", mtls=True)
    stats.record_request(key, 200, "-", 12.5, 100, 2000)
    inbound = stats.request_key(DESTINATION, SERVER, protocol=TCP)
    stats.tcp_opened(inbound)
    stats.record_tcp(inbound, 10, 20)
    stats.tcp_closed(inbound)
    for name in ENVOY_COUNTERS:
        assert name.startswith("envoy_cluster_"), name  # the one scope the proxy counts in so far
        stats.inc(("cluster", CLUSTER, name.removeprefix("envoy_cluster_")))
    stats.inc(("cluster", CLUSTER, "upstream_new_stat_total"))  # not in ENVOY_COUNTERS: HELP from its name
    stats.gauge_set(("cluster", CLUSTER, "upstream_cx_active"), 2)
    text = stats.render()
    new = "envoy_cluster_upstream_new_stat_total"
    assert f"# HELP {new} Envoy stat cluster.<cluster_name>.upstream_new_stat_total.\n" in text
    assert lint(text) == sorted(KNOWN)


def http_config(port: int, backend: int) -> dict[str, Any]:
    """A proxy config (pilot's schema): HTTP on 127.0.0.1:`port` (Host "svc") to `backend`."""
    config = make_config(endpoints={CLUSTER: [endpoint(backend)]})
    config["listeners"]["outbound"] = [{"name": f"svc_{port}", "service": "svc.default.svc.cluster.local",
                                        "addresses": [], "port": port, "protocol": "HTTP",
                                        "route_config": "80"}]
    return config


def get_svc(port: int) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"host": "svc"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read()


def test_the_proxy_process_serves_valid_metrics_before_and_after_traffic(tmp_path: Path) -> None:
    backend = Backend()
    port = free_port()
    proxy = Proxy(tmp_path, http_config(port, backend.port), workers=2)
    try:
        assert wait_for(proxy.ready, timeout=15), (tmp_path / "proxy.log").read_text()
        urls = [f"http://127.0.0.1:{proxy.stats}/stats/prometheus", f"http://127.0.0.1:{proxy.stats}/metrics",
                f"http://127.0.0.1:{proxy.admin}/stats/prometheus"]
        for url in urls:
            text = scrape(url)
            assert declared(text) == {*HELP, *ENVOY_COUNTERS}
            assert lint(text) == []
        assert get_svc(port) == b"backend"
        text = scrape(urls[0])
        assert "istio_request_duration_milliseconds_count{" in text
        assert "envoy_cluster_upstream_cx_total{" in text
        assert lint(text) == [UNIT]
    finally:
        proxy.stop()
        backend.close()
