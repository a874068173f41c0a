"""The sidecar's metrics: Istio's names, labels and buckets, Prometheus text that parses, worker merges."""

from __future__ import annotations

import json

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.proxy.stats import (
    DEFAULT_BUCKETS,
    DESTINATION,
    GRPC,
    LABELS,
    SOURCE,
    TCP,
    TCP_LABELS,
    Stats,
    Workload,
    merge,
    merge_admin,
)

LES = ["0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000",
       "60000", "300000", "600000", "1.8e+06", "3.6e+06", "+Inf"]
PRODUCTPAGE = Workload("productpage-v1", "default", "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                       "productpage", "v1", "productpage", "v1", "Kubernetes")
REVIEWS = Workload("reviews-v2", "default", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
                   "reviews", "v2", "reviews", "v2", "Kubernetes")
REVIEWS_HOST = "reviews.default.svc.cluster.local"


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name]


def only(text: str, name: str, **match: str) -> float:
    found = [v for labels, v in samples(text, name) if all(labels.get(k) == m for k, m in match.items())]
    assert len(found) == 1, (name, match, found)
    return found[0]


def buckets(text: str, name: str, **match: str) -> dict[str, float]:
    return {labels["le"]: v for labels, v in samples(text, name + "_bucket")
            if all(labels.get(k) == m for k, m in match.items())}


def outbound() -> tuple[Stats, object]:
    stats = Stats(PRODUCTPAGE)
    return stats, stats.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST, mtls=True)


def test_rendered_text_parses_with_istio_names_labels_and_buckets() -> None:
    stats, key = outbound()
    stats.record_request(key, 200, "-", 12.5, 120, 2000)
    stats.record_request(key, 200, "-", 300.0, 0, 5_000_000)
    stats.record_request(key, 503, "UF,URX", 1.0, 80, 91)
    text = stats.render()

    fams = {n: f for n, f in families(text).items() if f.samples}  # the rest: declared, no traffic yet
    assert {n: f.type for n, f in fams.items()} == {
        "istio_requests": "counter", "istio_request_duration_milliseconds": "histogram",
        "istio_request_bytes": "histogram", "istio_response_bytes": "histogram"}
    assert "# TYPE istio_requests_total counter" in text and "# HELP istio_requests_total " in text
    for labels, _ in samples(text, "istio_requests_total"):
        assert tuple(labels) == LABELS
    assert only(text, "istio_requests_total", response_code="200", response_flags="-") == 2
    assert only(text, "istio_requests_total", response_code="503", response_flags="UF,URX") == 1

    ok = {"response_code": "200"}
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert list(buckets(text, name, **ok)) == LES
        for labels, _ in samples(text, name + "_bucket"):
            assert tuple(labels) == (*LABELS, "le")
        assert only(text, name + "_count", **ok) == 2
    assert only(text, "istio_request_duration_milliseconds_sum", **ok) == 312.5
    assert only(text, "istio_request_bytes_sum", **ok) == 120
    dur = buckets(text, "istio_request_duration_milliseconds", **ok)
    assert [dur[le] for le in ("10", "25", "250", "500", "+Inf")] == [0, 1, 1, 2, 2]
    resp = buckets(text, "istio_response_bytes", **ok)
    assert [resp[le] for le in ("1000", "2500", "3.6e+06", "+Inf")] == [0, 1, 1, 2]
    assert buckets(text, "istio_request_bytes", **ok)["0.5"] == 1  # a zero-byte body


def test_a_value_on_a_bucket_edge_counts_in_that_bucket() -> None:
    stats, key = outbound()
    for value in (0.5, 5, 25, 3_600_000):
        stats.record_request(key, 200, "-", value, int(value), int(value))
    stats.record_request(key, 200, "-", 3_600_000.5, 3_600_001, 3_600_001)
    text = stats.render()
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        got = buckets(text, name)
        assert (got["0.5"], got["1"], got["5"], got["10"], got["25"], got["50"]) == (1, 1, 2, 2, 3, 3)
        assert (got["1.8e+06"], got["3.6e+06"], got["+Inf"]) == (3, 4, 5)
    # 0.5 B is no whole byte: the byte histograms see 0 there, which still lands in le="0.5"
    assert only(text, "istio_request_bytes_count") == 5


def test_istio_label_rules_for_each_reporter() -> None:
    stats = Stats(REVIEWS)
    inbound_mtls = stats.request_key(DESTINATION, PRODUCTPAGE, service_host=REVIEWS_HOST, mtls=True)
    inbound_plain = stats.request_key(DESTINATION, Workload(), service_host=REVIEWS_HOST)
    stats.record_request(inbound_mtls, 200, "-", 1, 1, 1)
    stats.record_request(inbound_plain, 200, "-", 1, 1, 1)
    text = stats.render()
    rows = {labels["connection_security_policy"]: labels
            for labels, _ in samples(text, "istio_requests_total")}
    assert set(rows) == {"mutual_tls", "none"}
    mtls, plain = rows["mutual_tls"], rows["none"]
    assert mtls["reporter"] == "destination"
    assert mtls["source_principal"] == PRODUCTPAGE.principal
    assert mtls["destination_principal"] == REVIEWS.principal
    assert (mtls["source_workload"], mtls["destination_workload"]) == ("productpage-v1", "reviews-v2")
    assert (mtls["destination_service"], mtls["destination_service_name"]) == (REVIEWS_HOST, "reviews")
    assert mtls["destination_service_namespace"] == "default"
    assert (plain["source_principal"], plain["destination_principal"]) == ("unknown", "unknown")
    assert plain["source_workload"] == plain["source_app"] == plain["source_cluster"] == "unknown"
    assert plain["source_canonical_revision"] == "latest"

    client = Stats(PRODUCTPAGE)
    # the peer's namespace comes from its SPIFFE id when there is one, as in Istio
    peer = Workload("ratings-v1", "", "spiffe://cluster.local/ns/bookinfo/sa/ratings", canonical_revision="")
    key = client.request_key(SOURCE, peer, service_host="ratings.bookinfo.svc.cluster.local", protocol=GRPC,
                             mtls=True)
    client.record_request(key, 200, "-", 1, 1, 1, grpc_status=14)
    [(labels, _)] = samples(client.render(), "istio_requests_total")
    assert labels["connection_security_policy"] == "unknown"
    assert (labels["reporter"], labels["request_protocol"], labels["grpc_response_status"]) == \
        ("source", "grpc", "14")
    assert labels["destination_workload_namespace"] == labels["destination_service_namespace"] == "bookinfo"
    assert labels["destination_canonical_revision"] == "latest"
    assert labels["source_workload"] == "productpage-v1"


def test_request_keys_are_cached_and_shared_by_equal_label_sets() -> None:
    stats, key = outbound()
    assert stats.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST, mtls=True) is key
    named = stats.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST, service_name="reviews", mtls=True)
    assert named is key
    assert stats.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST) is not key
    stats.record_request(key, 200, "-", 1, 1, 1)
    stats.record_request(named, 200, "-", 1, 1, 1)
    assert only(stats.render(), "istio_requests_total") == 2


def test_label_values_are_escaped() -> None:
    stats = Stats(PRODUCTPAGE)
    name = 'we"ird\\name\nwith "quotes"'
    key = stats.request_key(SOURCE, Workload(name=name), service_host="x\udcff.svc")
    stats.record_request(key, 200, "-", 1, 1, 1)
    text = stats.render()
    assert r'destination_workload="we\"ird\\name\nwith \"quotes\""' in text
    [(labels, _)] = samples(text, "istio_requests_total")
    assert labels["destination_workload"] == name
    assert labels["destination_service"] == "x\ufffd\ufffd\ufffd.svc"  # a lone surrogate cannot be sent
    text.encode("utf-8")


def test_tcp_metrics_have_istio_tcp_labels() -> None:
    stats = Stats(REVIEWS)
    key = stats.request_key(DESTINATION, PRODUCTPAGE, service_host=REVIEWS_HOST, protocol=TCP, mtls=True)
    stats.tcp_opened(key)
    stats.record_tcp(key, 100, 40)
    stats.record_tcp(key, 20, 2)
    stats.tcp_closed(key)
    stats.tcp_opened(key)
    stats.tcp_closed(key, "UF")
    text = stats.render()
    assert {f.name for f in text_string_to_metric_families(text) if f.samples} == {
        "istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes"}
    for labels, _ in samples(text, "istio_tcp_sent_bytes_total"):
        assert tuple(labels) == TCP_LABELS
        assert labels["request_protocol"] == "tcp"
    assert only(text, "istio_tcp_connections_opened_total", response_flags="-") == 2
    assert only(text, "istio_tcp_connections_closed_total", response_flags="-") == 1
    assert only(text, "istio_tcp_connections_closed_total", response_flags="UF") == 1
    assert only(text, "istio_tcp_sent_bytes_total", response_flags="-") == 120
    assert only(text, "istio_tcp_received_bytes_total", response_flags="-") == 42


def test_merging_two_workers_sums_every_series() -> None:
    a, key_a = outbound()
    b, key_b = outbound()
    for _ in range(3):
        a.record_request(key_a, 200, "-", 7.0, 10, 100)
    b.record_request(key_b, 200, "-", 70.0, 10, 100)
    b.record_request(key_b, 404, "NR", 0.2, 0, 0)
    tcp = b.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST, protocol=TCP)
    b.tcp_opened(tcp)
    b.record_tcp(tcp, 5, 6)
    upstream_rq = ("cluster", "outbound|9080||" + REVIEWS_HOST, "upstream_rq_total")
    a.inc(upstream_rq, 3)
    b.inc(upstream_rq, 2)
    a.gauge_add(("cluster", "outbound|9080||" + REVIEWS_HOST, "upstream_cx_active"), 2)
    b.gauge_add(("cluster", "outbound|9080||" + REVIEWS_HOST, "upstream_cx_active"), 1)
    # snapshots travel between processes as msgpack or JSON
    snaps = [msgpack.unpackb(msgpack.packb(a.snapshot())), json.loads(json.dumps(b.snapshot()))]
    text = merge(snaps)

    assert only(text, "istio_requests_total", response_code="200") == 4
    assert only(text, "istio_requests_total", response_code="404", response_flags="NR") == 1
    dur = buckets(text, "istio_request_duration_milliseconds", response_code="200")
    assert (dur["5"], dur["10"], dur["50"], dur["100"], dur["+Inf"]) == (0, 3, 3, 4, 4)
    assert only(text, "istio_request_duration_milliseconds_sum", response_code="200") == 91
    assert only(text, "istio_request_bytes_count", response_code="200") == 4
    assert only(text, "istio_tcp_connections_opened_total") == 1
    assert only(text, "istio_tcp_received_bytes_total") == 6
    assert only(text, "envoy_cluster_upstream_rq_total") == 5
    assert only(text, "envoy_cluster_upstream_cx_active") == 3
    assert merge_admin(snaps).splitlines() == [
        f"cluster.outbound|9080||{REVIEWS_HOST}.upstream_cx_active: 3",
        f"cluster.outbound|9080||{REVIEWS_HOST}.upstream_rq_total: 5",
    ]
    assert merge([a.snapshot()]) == a.render()
    assert merge([]) == Stats(PRODUCTPAGE).render()  # no worker answered: every family, no sample


def test_merge_refuses_workers_with_different_buckets() -> None:
    a, _ = outbound()
    b = Stats(PRODUCTPAGE, buckets={"istio_request_bytes": [1, 10, 100]})
    with pytest.raises(ValueError, match="buckets differ"):
        merge([a.snapshot(), b.snapshot()])
    with pytest.raises(ValueError, match="version"):
        merge([{**a.snapshot(), "version": 99}])


def test_custom_buckets_like_the_stats_histogram_buckets_annotation() -> None:
    stats = Stats(PRODUCTPAGE, buckets={"istio_request_bytes": [1, 10, 100, 1000]})
    key = stats.request_key(SOURCE, REVIEWS, service_host=REVIEWS_HOST)
    stats.record_request(key, 200, "-", 3, 10, 5000)
    text = stats.render()
    assert buckets(text, "istio_request_bytes") == {"1": 0, "10": 1, "100": 1, "1000": 1, "+Inf": 1}
    assert list(buckets(text, "istio_response_bytes")) == LES
    assert stats.buckets["istio_request_duration_milliseconds"] == DEFAULT_BUCKETS
    with pytest.raises(ValueError, match="increasing"):
        Stats(PRODUCTPAGE, buckets={"istio_request_bytes": [10, 1]})


def test_internal_stats_render_envoy_style() -> None:
    stats = Stats(PRODUCTPAGE)
    stats.inc(("cluster", "outbound|9080||" + REVIEWS_HOST, "upstream_rq_total"))
    stats.inc(("listener", "0.0.0.0_15006", "downstream_cx_total"), 4)
    stats.inc(("server", "worker_restarts"))
    stats.gauge_set(("server", "live"), 1)
    stats.gauge_add(("http", "inbound_0.0.0.0_15006", "downstream_rq_active"), 2)
    text = stats.render()
    fams = families(text)
    assert fams["envoy_server_live"].type == "gauge"
    assert fams["envoy_http_downstream_rq_active"].type == "gauge"
    assert fams["envoy_cluster_upstream_rq"].type == "counter"  # the parser drops "_total"
    assert only(text, "envoy_cluster_upstream_rq_total", cluster_name="outbound|9080||" + REVIEWS_HOST) == 1
    assert only(text, "envoy_listener_downstream_cx_total", listener_address="0.0.0.0_15006") == 4
    http_prefix = "inbound_0.0.0.0_15006"
    assert only(text, "envoy_http_downstream_rq_active", http_conn_manager_prefix=http_prefix) == 2
    assert "\nenvoy_server_worker_restarts 1\n" in text  # Envoy's name; the parser adds "_total"
    assert only(text, "envoy_server_worker_restarts_total") == 1
    assert "listener.0.0.0.0_15006.downstream_cx_total: 4\n" in stats.render_admin()
    assert "server.live: 1\n" in stats.render_admin()


def test_bad_keys_are_refused_when_built_not_when_used() -> None:
    stats = Stats(PRODUCTPAGE)
    with pytest.raises(ValueError, match="reporter"):
        stats.request_key("client", REVIEWS)
    with pytest.raises(ValueError, match="protocol"):
        stats.request_key(SOURCE, REVIEWS, protocol="udp")
