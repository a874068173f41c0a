"""Istio's bookinfo tasks, end to end: routing, faults, retries, egress policy and telemetry, all
through transparent interception (the apps dial service names; iptables hands them to the sidecars).

Request counts are small; each split is checked against bounds more than 5 standard deviations
wide, so a correct mesh cannot fail them while a wrong split (or none) does.
"""

from __future__ import annotations

import time

import pytest

from meshctl.localmesh.mesh import EXTERNAL_IP, EXTERNAL_PORT, Mesh, MeshError
from tests.e2e.conftest import get_json, metric, sample, scrape, versions


def test_productpage_reaches_details_and_reviews_by_name_through_the_sidecars(mesh: Mesh) -> None:
    status, page = get_json(mesh, "productpage", "/productpage")
    assert status == 200, page
    assert page["service"] == "productpage" and page["details"]["service"] == "details"
    assert page["reviews"]["version"] in ("v1", "v2", "v3")
    # the hops went through sidecars: sleep's reported its outbound call, productpage's its inbound one
    sleep = scrape(mesh, "sleep", 15090, "/stats/prometheus")
    assert metric(sleep, "istio_requests_total", reporter="source", source_app="sleep",
                  destination_service_name="productpage", response_code="200") >= 1
    page_proxy = scrape(mesh, "productpage", 15090, "/stats/prometheus")
    assert metric(page_proxy, "istio_requests_total", reporter="destination",
                  destination_app="productpage") >= 1
    assert metric(page_proxy, "istio_requests_total", reporter="source",
                  destination_service_name="reviews") >= 1


def test_without_routes_reviews_spreads_over_all_three_versions(mesh: Mesh) -> None:
    seen = versions(mesh, "reviews", "/reviews/0", 45)
    assert set(seen) == {"v1", "v2", "v3"}, seen  # P(a version never picked) < 3 * (2/3)^45 = 4e-8


def test_weighted_split_80_20(mesh: Mesh, config) -> None:
    config("vs-reviews.yaml", sample("virtual-service-reviews-80-20.yaml"))
    seen = versions(mesh, "reviews", "/reviews/0", 120)
    assert seen["v3"] == 0 and seen["v1"] + seen["v2"] == 120, seen
    assert 74 <= seen["v1"] <= 118, seen  # mean 96, sd 4.4: 5 sd either way


def test_weighted_split_90_10(mesh: Mesh, config) -> None:
    config("vs-reviews.yaml", sample("virtual-service-reviews-90-10.yaml"))
    seen = versions(mesh, "reviews", "/reviews/0", 150)
    assert seen["v3"] == 0 and seen["v1"] + seen["v2"] == 150, seen
    assert 116 <= seen["v1"] <= 149, seen  # mean 135, sd 3.7; P(no v2 at all) = 0.9^150 = 1e-7


def test_end_user_jason_goes_to_v2_everyone_else_to_v3(mesh: Mesh, config) -> None:
    config("vs-reviews.yaml", sample("virtual-service-reviews-jason-v2-v3.yaml"))
    # productpage forwards end-user to reviews: the match is made at productpage's sidecar
    jason = versions(mesh, "productpage", "/productpage", 10, {"end-user": "jason"}, pick=("reviews",))
    others = versions(mesh, "productpage", "/productpage", 10, {"end-user": "mallory"}, pick=("reviews",))
    assert jason == {"v2": 10} and others == {"v3": 10}, (jason, others)


def test_fault_delay_for_jason(mesh: Mesh, config) -> None:
    config("vs-reviews.yaml", sample("virtual-service-reviews-test-v2.yaml"))  # jason -> reviews v2
    # Istio's sample delays 7 s; 1 s shows the same and keeps the suite short
    config("vs-ratings.yaml", sample("virtual-service-ratings-test-delay.yaml").replace("fixedDelay: 7s",
                                                                                        "fixedDelay: 1s"))
    started = time.monotonic()
    status, page = get_json(mesh, "productpage", "/productpage", {"end-user": "jason"})
    elapsed = time.monotonic() - started
    assert status == 200 and page["reviews"]["version"] == "v2", page
    assert page["reviews"]["ratings"]["service"] == "ratings", page  # delayed, not failed
    assert elapsed >= 1.0  # the injected delay is a lower bound, whatever the machine
    reviews_v2 = scrape(mesh, "reviews-v2", 15090, "/stats/prometheus")
    assert metric(reviews_v2, "istio_requests_total", reporter="source", destination_service_name="ratings",
                  response_flags="DI") >= 1


def test_fault_abort_for_jason(mesh: Mesh, config) -> None:
    config("vs-reviews.yaml", sample("virtual-service-reviews-test-v2.yaml"))
    config("vs-ratings.yaml", sample("virtual-service-ratings-test-abort.yaml"))
    status, page = get_json(mesh, "productpage", "/productpage", {"end-user": "jason"})
    assert status == 200 and page["reviews"]["version"] == "v2", page
    assert page["reviews"]["ratings"]["error"] == 500, page  # "ratings service is currently unavailable"
    status, ratings = get_json(mesh, "ratings", "/ratings/0", {"end-user": "mallory"})
    assert status == 200 and ratings["service"] == "ratings", ratings
    reviews_v2 = scrape(mesh, "reviews-v2", 15090, "/stats/prometheus")
    assert metric(reviews_v2, "istio_requests_total", reporter="source", destination_service_name="ratings",
                  response_code="500", response_flags="FI") >= 1


RETRIES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: 5xx
"""


def test_retry_hides_a_backend_that_fails_once(mesh: Mesh, config) -> None:
    status, body = get_json(mesh, "details", "/details/0", {"x-fail-once": "without-retries"})
    assert status == 500 and body["error"] == "failing once", body  # Istio's default retries skip 500
    config("vs-details.yaml", RETRIES)
    status, body = get_json(mesh, "details", "/details/0", {"x-fail-once": "with-retries"})
    assert status == 200 and body["service"] == "details", body
    details = scrape(mesh, "details", 15090, "/stats/prometheus")
    # the sidecar beside details saw both attempts: the failure and the retry that answered
    assert metric(details, "istio_requests_total", reporter="destination", response_code="500") >= 2
    assert metric(details, "istio_requests_total", reporter="destination", response_code="200") >= 1


REGISTRY_ONLY = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: istio-system
spec:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
"""


def external_get(mesh: Mesh) -> tuple[int, bytes] | str:
    try:
        return mesh.http("sleep", EXTERNAL_IP, EXTERNAL_PORT, "/", {"Host": "example.com"}, timeout=5)
    except OSError as exc:
        return type(exc).__name__


def test_registry_only_blocks_an_address_outside_the_mesh(mesh: Mesh, config) -> None:
    assert external_get(mesh)[0] == 200  # ALLOW_ANY: passed through to "the internet"
    # pilot takes no MeshConfig, so the mesh-wide default is set as Istio also allows: a Sidecar
    # without a workloadSelector in the root namespace
    config("sidecar-registry-only.yaml", REGISTRY_ONLY)
    blocked = external_get(mesh)
    assert isinstance(blocked, str) or blocked[0] in (502, 503), blocked
    status, page = get_json(mesh, "productpage", "/productpage")  # mesh services still work
    assert status == 200, page


def test_metrics_on_15090_and_merged_on_15020(mesh: Mesh) -> None:
    for _ in range(3):
        assert get_json(mesh, "productpage", "/productpage")[0] == 200
    proxy = scrape(mesh, "productpage", 15090, "/stats/prometheus")
    merged = scrape(mesh, "productpage", 15020, "/stats/prometheus")
    for text in (proxy, merged):
        assert metric(text, "istio_requests_total", reporter="destination", destination_app="productpage",
                      destination_version="v1", response_code="200") >= 3
        assert metric(text, "istio_requests_total", reporter="source", source_app="productpage",
                      destination_service_name="details") >= 3
    assert "zmesh_agent_" in merged and "zmesh_agent_" not in proxy  # the agent's own families, merged


STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def plaintext_from_outside(mesh: Mesh) -> tuple[int, bytes] | str:
    """GET productpage's pod address from "the internet" namespace: no sidecar, no certificate."""
    try:
        return mesh.http(None, mesh.pod("productpage").ip, 9080, "/productpage", ns=mesh.net_ns, timeout=5)
    except OSError as exc:
        return type(exc).__name__


def test_strict_mtls_refuses_plaintext_from_outside_the_mesh(mesh: Mesh, config) -> None:
    assert plaintext_from_outside(mesh)[0] == 200  # PERMISSIVE (the default) takes plain text
    config("peer-authentication-strict.yaml", STRICT)
    refused = plaintext_from_outside(mesh)
    assert isinstance(refused, str), refused  # the connection is closed, no HTTP answer
    status, page = get_json(mesh, "productpage", "/productpage")  # sidecar to sidecar: mutual TLS
    assert status == 200 and page["details"]["service"] == "details", page
    page_proxy = scrape(mesh, "productpage", 15090, "/stats/prometheus")
    assert metric(page_proxy, "istio_requests_total", reporter="destination", destination_app="productpage",
                  source_principal="spiffe://cluster.local/ns/default/sa/sleep",
                  connection_security_policy="mutual_tls") >= 1


DENY_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: details-deny-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
  - to:
    - operation:
        paths: ["/details/secret*"]
"""


def test_authorization_policy_denies_with_403(mesh: Mesh, config) -> None:
    assert get_json(mesh, "details", "/details/0")[0] == 200
    config("authz-details.yaml", DENY_SLEEP)
    details = mesh.layout.vips["details"]
    status, body = mesh.http("sleep", details, 9080, "/details/0", {"Host": "details:9080"})
    assert status == 403 and body == b"RBAC: access denied", body  # sleep's identity is denied
    status, page = get_json(mesh, "productpage", "/productpage")  # productpage's is not ...
    assert status == 200 and page["details"]["service"] == "details", page
    # ... except on the denied path, for everyone
    status, _ = get_json(mesh, "details", "/details/secret-1", client="productpage")
    assert status == 403


def test_a_file_galley_rejects_is_reported_and_changes_nothing(mesh: Mesh) -> None:
    bad = sample("virtual-service-reviews-80-20.yaml").replace("weight: 80", "weight: 150")
    path = mesh.config_dir / "vs-bad.yaml"
    try:
        with pytest.raises(MeshError, match=r"galley\.log"):
            mesh.apply(path.name, bad, timeout=3)
    finally:
        path.unlink(missing_ok=True)
    assert "vs-bad.yaml" in (mesh.logs / "galley.log").read_text()
    assert set(versions(mesh, "reviews", "/reviews/0", 45)) == {"v1", "v2", "v3"}  # no 80-20 in force


def test_dialling_the_sidecars_own_ports_from_the_pod_is_blackholed_and_the_pod_keeps_working(
        mesh: Mesh) -> None:
    """Issue 12: `curl 127.0.0.1:15001` in the sleep pod (or its own address on 15001 or 15006) used to
    make its sidecar connect to itself until it ran out of fds; now it is closed (BlackHoleCluster)."""
    sleep = mesh.pod("sleep")
    own = [("127.0.0.1", 15001), (sleep.ip, 15001), (sleep.ip, 15006)]
    for host, port in own:
        with pytest.raises(ConnectionResetError):  # http.client's RemoteDisconnected: closed, no answer
            mesh.http(sleep, host, port, "/", {"Host": "unknown.example"})
    status, page = get_json(mesh, "productpage", "/productpage")
    assert status == 200 and page["service"] == "productpage", page
    stats = scrape(mesh, "sleep", 15090, "/stats/prometheus")
    blackholed = metric(stats, "envoy_cluster_upstream_cx_none_healthy", cluster_name="BlackHoleCluster")
    assert blackholed >= len(own), stats
