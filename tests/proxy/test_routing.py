"""Route matching and per-route decisions: bookinfo's samples through pilot's translation and
then the router, every match kind, header ops, rewrites, redirects, faults, retries."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy.cluster import CONNECT_FAILURE, REFUSED_STREAM, RESET, TIMEOUT
from dataplane.proxy.http.router import Plan
from dataplane.proxy.routing import (
    HeaderOps,
    Request,
    RetryPolicy,
    Route,
    RouteConfig,
    VirtualHost,
    build_route_configs,
)
from tests.pilot.test_translation import config, files, host, resources, vs

REVIEWS = "reviews:9080"


def subset(name: str, version: str) -> str:
    return f"outbound|9080|{version}|{host(name)}"


def router(cfg: dict[str, Any], port: int = 9080) -> RouteConfig:
    return build_route_configs(cfg)[str(port)]


def bookinfo_router(istio_testdata: Path, *samples: str) -> RouteConfig:
    b = istio_testdata / "bookinfo"
    return router(config(files(*(b / s for s in samples))))


def get(authority: str, path: str = "/", method: str = "GET", scheme: str = "http",
        **headers: str) -> Request:
    return Request(method, path, authority, {k.replace("_", "-"): v for k, v in headers.items()}, scheme)


def one_route(match: dict[str, Any], **extra: Any) -> VirtualHost:
    """A virtual host with one route that has `match`, as pilot would send it."""
    return VirtualHost({"name": "h", "domains": ["h"], "routes": [
        {"name": "r", "match": match, "clusters": [{"name": "c", "weight": 100}], **extra}]})


# --- bookinfo ------------------------------------------------------------------------------------


def test_reviews_80_20_weights_hold_over_10000_picks(istio_testdata: Path) -> None:
    rc = bookinfo_router(istio_testdata, "virtual-service-reviews-80-20.yaml", "destination-rule-all.yaml")
    route = rc.match(get(REVIEWS, "/reviews/0"))
    assert route is not None and route.virtual_service == "default/reviews"
    rng = random.Random(42)
    picks = Counter(route.pick_cluster(rng.random()).name for _ in range(10_000))
    assert set(picks) == {subset("reviews", "v1"), subset("reviews", "v2")}
    # binomial(10000, 0.8): sd 40, so ±160 is four standard deviations
    assert 7840 <= picks[subset("reviews", "v1")] <= 8160
    # the split is exact in u: weight/100 of [0, 1) each, in order
    assert route.pick_cluster(0.0).name == route.pick_cluster(0.7999).name == subset("reviews", "v1")
    assert route.pick_cluster(0.8).name == route.pick_cluster(0.9999).name == subset("reviews", "v2")


@pytest.mark.parametrize("authority", ["reviews", REVIEWS, host("reviews"), f"{host('reviews')}:9080",
                                       "reviews.default.svc", "REVIEWS.default", "10.96.0.3:9080"])
def test_reviews_jason_goes_to_v2_everyone_else_to_v3(istio_testdata: Path, authority: str) -> None:
    rc = bookinfo_router(istio_testdata, "virtual-service-reviews-jason-v2-v3.yaml")
    assert rc.select_virtual_host(authority).service == host("reviews")

    def destination(**headers: str) -> str:
        route = rc.match(get(authority, "/reviews/0", **headers))
        assert route is not None
        return route.pick_cluster(0.5).name

    assert destination(end_user="jason") == subset("reviews", "v2")
    assert destination(end_user="Jason") == subset("reviews", "v3")  # values match case-sensitively
    assert destination(end_user="jasonx") == subset("reviews", "v3")
    assert destination() == subset("reviews", "v3")


def test_details_fault_aborts_every_request_with_555(istio_testdata: Path) -> None:
    rc = bookinfo_router(istio_testdata, "fault-injection-details-v1.yaml")
    route = rc.match(get("details:9080", "/details/0"))
    assert route is not None and route.fault is not None
    rng = random.Random(1)
    decisions = {route.fault.decide(rng.random(), rng.random()) for _ in range(1000)}
    assert decisions == {(0, 555, None)}  # 100%: always an abort, never a delay
    assert route.pick_cluster(0.3).name == subset("details", "v1")


def test_ratings_delay_and_abort_only_for_jason(istio_testdata: Path) -> None:
    delay = bookinfo_router(istio_testdata, "virtual-service-ratings-test-delay.yaml")
    jason = delay.match(get("ratings:9080", "/ratings/0", end_user="jason"))
    assert jason is not None and jason.fault is not None
    assert jason.fault.decide(0.99, 0.0) == (7000, None, None)
    other = delay.match(get("ratings:9080", "/ratings/0"))
    assert other is not None and other.fault is None
    abort = bookinfo_router(istio_testdata, "virtual-service-ratings-test-abort.yaml")
    jason = abort.match(get("ratings:9080", "/ratings/0", end_user="jason"))
    assert jason is not None and jason.fault is not None
    assert jason.fault.decide(0.5, 0.99) == (0, 500, None)


def test_fault_percentages_are_independent_draws() -> None:
    route = Route({"name": "f", "match": {}, "clusters": [{"name": "c", "weight": 100}],
                   "fault": {"delay": {"fixed_delay_ms": 100, "percentage": 25.0},
                             "abort": {"grpc_status": 14, "percentage": 10.0}}})
    assert route.fault is not None
    rng = random.Random(3)
    decisions = [route.fault.decide(rng.random(), rng.random()) for _ in range(20_000)]
    delayed = sum(d.delay_ms == 100 for d in decisions)
    aborted = sum(d.grpc_status == 14 for d in decisions)
    assert 4700 <= delayed <= 5300  # 25% of 20000, sd ~61
    assert 1800 <= aborted <= 2200  # 10% of 20000, sd ~42
    assert all(d.http_status is None for d in decisions)
    both = sum(d.delay_ms == 100 and d.grpc_status == 14 for d in decisions)
    assert 400 <= both <= 600  # 2.5%: the draws are independent
    assert route.fault.decide(0.25, 0.1) == (0, None, None)  # the boundaries are exclusive


def test_route_actions_from_translation() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /slow}}]
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,connect-failure,409"}
    mirror: {host: ratings}
    mirrorPercentage: {value: 25}
    rewrite: {uri: /fast, authority: reviews.internal}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: example.com, redirectCode: 302}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {string: gone}}
  - match: [{uri: {exact: /no-retries}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
"""))
    rc = router(config(res))
    slow = rc.match(get(REVIEWS, "/slow/path?q=1"))
    assert slow is not None and slow.name == "" and slow.timeout_ms == 1500
    assert slow.retry is not None and slow.retry.attempts == 3 and slow.retry.per_try_timeout_ms == 500
    assert slow.retry.should_retry(0, status=409) and slow.retry.should_retry(2, failure=CONNECT_FAILURE)
    assert not slow.retry.should_retry(3, status=503)
    assert slow.rewrite is not None
    assert slow.rewrite.path("/slow/path?q=1") == "/fast/path?q=1"
    assert slow.rewrite.authority == "reviews.internal"
    [mirror] = slow.mirrors
    assert mirror.cluster == f"outbound|9080||{host('ratings')}"
    assert mirror.sampled(0.2499) and not mirror.sampled(0.25)
    old = rc.match(get(REVIEWS, "/old?x=1"))
    assert old is not None and old.redirect is not None and not old.clusters
    assert (old.redirect.code, old.redirect.location(get(REVIEWS, "/old?x=1"))) == (302, "http://example.com/new?x=1")
    gone = rc.match(get(REVIEWS, "/gone"))
    assert gone is not None and gone.direct_response == (410, "gone")
    no_retries = rc.match(get(REVIEWS, "/no-retries"))
    assert no_retries is not None and no_retries.retry is None
    # no catch-all rule: anything else gets no route (Envoy's 404)
    assert rc.match(get(REVIEWS, "/elsewhere")) is None


def test_default_route_has_istio_default_retries() -> None:
    route = router(config([])).match(get(REVIEWS))
    assert route is not None and route.name == "default" and route.retry is not None
    retry = route.retry
    assert retry.attempts == 2
    assert retry.should_retry(0, status=503) and not retry.should_retry(0, status=502)
    assert retry.should_retry(1, failure=CONNECT_FAILURE) and retry.should_retry(1, failure=REFUSED_STREAM)
    assert not retry.should_retry(0, failure=RESET)
    assert retry.should_retry(0, status=200, grpc_status=14)  # unavailable
    assert retry.should_retry(0, status=200, grpc_status=1)  # cancelled
    assert not retry.should_retry(0, status=200, grpc_status=13)
    assert not retry.should_retry(2, status=503)


# --- virtual hosts -------------------------------------------------------------------------------


def test_virtual_host_selection_and_fallbacks() -> None:
    rc = router(config([]))
    for name in ("reviews", "ratings", "details", "productpage"):
        assert rc.select_virtual_host(f"{name}:9080").service == host(name)
    fallback = rc.select_virtual_host("unknown.example.com")
    assert fallback is not None and fallback.domains == ("*",)
    route = rc.match(get("unknown.example.com"))
    assert route is not None and route.pick_cluster(0.9).name == "PassthroughCluster"
    assert route.retry is None
    blocked = router(config([], mesh={"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}))
    route = blocked.match(get("unknown.example.com"))
    assert route is not None and route.direct_response == (502, "") and route.pick_cluster(0.1) is None


def test_wildcard_domains_take_the_longest_suffix_and_need_a_label() -> None:
    rc = RouteConfig({"name": "80", "virtual_hosts": [
        {"name": "a", "domains": ["*.example.com"], "routes": []},
        {"name": "b", "domains": ["*.api.example.com"], "routes": []},
        {"name": "c", "domains": ["exact.api.example.com"], "routes": []},
        {"name": "any", "domains": ["*"], "routes": []}]})
    names = {h: rc.select_virtual_host(h).name for h in (
        "www.example.com", "v1.api.example.com", "exact.api.example.com", "Exact.API.example.com",
        ".example.com", "example.com")}
    assert names == {"www.example.com": "a", "v1.api.example.com": "b", "exact.api.example.com": "c",
                     "Exact.API.example.com": "c", ".example.com": "any", "example.com": "any"}
    assert RouteConfig({"name": "x", "virtual_hosts": []}).select_virtual_host("a") is None


def test_first_matching_route_wins_in_order() -> None:
    vh = VirtualHost({"name": "h", "domains": ["h"], "routes": [
        {"name": "api", "match": {"uri": {"prefix": "/api"}}, "clusters": [{"name": "a", "weight": 100}]},
        {"name": "api-v2", "match": {"uri": {"prefix": "/api/v2"}},
         "clusters": [{"name": "b", "weight": 100}]},
        {"name": "rest", "match": {}, "clusters": [{"name": "c", "weight": 100}]}]})
    assert [vh.match(get("h", p)).name for p in ("/api/v2/x", "/api", "/ap")] == ["api", "api", "rest"]


# --- match kinds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("match", "hits", "misses"), [
    ({"uri": {"exact": "/a"}}, [get("h", "/a"), get("h", "/a?x=/b")], [get("h", "/a/"), get("h", "/A")]),
    ({"uri": {"exact": "/a"}, "ignore_uri_case": True}, [get("h", "/A"), get("h", "/a")], [get("h", "/ab")]),
    ({"uri": {"prefix": "/api/"}}, [get("h", "/api/"), get("h", "/api/x?y")],
     [get("h", "/api"), get("h", "/API/")]),
    ({"uri": {"prefix": "/Api"}, "ignore_uri_case": True}, [get("h", "/aPI/x")], [get("h", "/ap")]),
    ({"uri": {"regex": "/v[0-9]+/.*"}}, [get("h", "/v2/x"), get("h", "/v10/?q")], [get("h", "/x/v2/x")]),
    # ignore_uri_case applies to exact and prefix only, as in Istio
    ({"uri": {"regex": "/v[0-9]+"}, "ignore_uri_case": True}, [get("h", "/v1")], [get("h", "/V1")]),
    ({"method": {"exact": "POST"}}, [get("h", method="POST")], [get("h"), get("h", method="post")]),
    ({"method": {"regex": "GET|HEAD"}}, [get("h"), get("h", method="HEAD")], [get("h", method="GETX")]),
    ({"scheme": {"exact": "https"}}, [get("h", scheme="https")], [get("h")]),
    ({"authority": {"prefix": "rev"}}, [get("reviews:9080")], [get("ratings")]),
    ({"authority": {"regex": "rev.*:9080"}}, [get("reviews:9080")], [get("reviews")]),
    ({"headers": {"x-env": {"exact": "prod"}}}, [get("h", x_env="prod")],
     [get("h", x_env="prod2"), get("h")]),
    ({"headers": {"x-env": {"prefix": "pr"}}}, [get("h", x_env="prod")], [get("h", x_env="dev")]),
    ({"headers": {"x-env": {"regex": "p.*d"}}}, [get("h", x_env="prod")], [get("h", x_env="prods")]),
    ({"headers": {"x-trace": {"present": True}}}, [get("h", x_trace=""), get("h", x_trace="1")], [get("h")]),
    ({"without_headers": {"x-skip": {"exact": "yes"}}}, [get("h"), get("h", x_skip="no")],
     [get("h", x_skip="yes")]),
    ({"without_headers": {"x-skip": {"present": True}}}, [get("h")], [get("h", x_skip="")]),
    ({"query_params": {"debug": {"exact": "1"}}}, [get("h", "/?debug=1"), get("h", "/?a=b&debug=1&debug=2")],
     [get("h", "/?debug=2&debug=1"), get("h", "/?debug=10"), get("h", "/")]),
    ({"query_params": {"flag": {"present": True}}}, [get("h", "/?flag"), get("h", "/?flag=")],
     [get("h", "/?fla")]),
    ({"query_params": {"q": {"regex": "a b"}}}, [get("h", "/?q=a%20b")], [get("h", "/?q=a+b")]),
    ({"query_params": {"q": {"prefix": "ab"}}}, [get("h", "/?q=abc")], [get("h", "/?q=xab")]),
    ({"uri": {"prefix": "/api"}, "method": {"exact": "GET"}, "headers": {"x-a": {"exact": "1"}}},
     [get("h", "/api", x_a="1")],
     [get("h", "/api", method="PUT", x_a="1"), get("h", "/api"), get("h", "/", x_a="1")]),
])
def test_every_match_kind(match: dict[str, Any], hits: list[Request], misses: list[Request]) -> None:
    vh = one_route(match)
    assert all(vh.match(r) is not None for r in hits)
    assert all(vh.match(r) is None for r in misses)


def test_translated_matches_behave_as_written() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - name: everything
    match:
    - uri: {prefix: /api}
      ignoreUriCase: true
      method: {exact: GET}
      authority: {regex: "rev.*"}
      headers: {X-Env: {prefix: prod}, x-trace: {}}
      queryParams: {debug: {exact: "1"}, flag: {}}
      withoutHeaders: {x-skip: {exact: "yes"}}
    - uri: {regex: "^/v[0-9]+/.*"}
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""))
    rc = router(config(res))
    full = {"x_env": "production", "x_trace": "abc"}

    def where(path: str, method: str = "GET", authority: str = REVIEWS, **headers: str) -> str:
        route = rc.match(get(authority, path, method, **headers))
        assert route is not None
        return route.pick_cluster(0.0).name.split("|")[2]

    assert where("/API/x?debug=1&flag", **full) == "v2"
    assert where("/API/x?debug=1&flag", **full, x_skip="yes") == "v1"
    assert where("/API/x?debug=1&flag", **full, x_skip="no") == "v2"
    assert where("/API/x?debug=1", **full) == "v1"  # flag missing
    assert where("/api?debug=1&flag", "POST", **full) == "v1"
    assert where("/api?debug=1&flag", x_env="production") == "v1"  # x-trace missing
    assert where("/api?debug=1&flag", authority="10.96.0.3:9080", **full) == "v1"  # authority regex fails
    assert where("/v3/anything") == "v2"  # the second match of the same rule
    assert where("/v3") == "v1"


# --- header ops, rewrites, redirects ---------------------------------------------------------------


def _applied(ops: HeaderOps | None, fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The field lines a message carries after `ops`, as the proxy sends them (exchange.py)."""
    if ops is None:
        return [b": ".join(f) for f in fields]
    return [b": ".join(f) for f in ops.kept(fields)] + list(ops.add)


def test_header_ops_remove_then_set_then_add_with_names_lowercased() -> None:
    ops = HeaderOps({"remove": ["X-Gone", "x-set"], "set": {"X-Set": "1"},
                     "add": {"x-add": "b", "x-new": "n"}})
    fields = [(b"x-gone", b"g"), (b"x-set", b"0"), (b"x-add", b"a"), (b"keep", b"k")]
    # an added value is a field line of its own, as Envoy's append (not a comma-joined rewrite)
    assert _applied(ops, fields) == [b"x-add: a", b"keep: k", b"x-set: 1", b"x-add: b", b"x-new: n"]
    assert not HeaderOps(None) and not HeaderOps({}) and ops


def test_header_ops_leave_out_fields_that_cannot_be_sent() -> None:
    ops = HeaderOps({"set": {"bad name": "1", "x-ctl": "a\r\nb", "x-wide": "\u2603", "x-ok": "fine"}})
    assert ops.add == (b"x-ok: fine",)


def test_route_header_ops_apply_after_the_weighted_cluster_ones() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - headers:
      request: {set: {x-who: route}, remove: [x-secret]}
      response: {add: {x-served-by: route}}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 50
      headers: {request: {set: {x-who: v1, x-subset: v1}}, response: {set: {x-served-by: v1}}}
    - destination: {host: reviews, subset: v2}
      weight: 50
"""))
    route = router(config(res)).match(get(REVIEWS))
    assert route is not None
    v1, v2 = route.pick_cluster(0.1), route.pick_cluster(0.9)
    plan = Plan(route, None, route.name)  # what the proxy applies per weighted cluster
    req_v1, resp_v1 = plan.ops[v1.name]
    assert v2.name not in plan.ops
    request = [(b"x-secret", b"s"), (b"x-who", b"caller")]
    assert _applied(req_v1, request) == [b"x-subset: v1", b"x-who: route"]  # the route's set wins
    assert _applied(plan.req_ops, [(b"x-secret", b"s")]) == [b"x-who: route"]
    assert _applied(resp_v1, []) == [b"x-served-by: v1", b"x-served-by: route"]
    assert _applied(plan.resp_ops, []) == [b"x-served-by: route"]


@pytest.mark.parametrize(("match", "rewrite", "path", "expected"), [
    ({"uri": {"prefix": "/api/v1"}}, {"uri": "/v2"}, "/api/v1/users?id=3", "/v2/users?id=3"),
    ({"uri": {"prefix": "/API"}, "ignore_uri_case": True}, {"uri": "/x"}, "/api/y", "/x/y"),
    ({"uri": {"exact": "/old"}}, {"uri": "/new"}, "/old?a=1", "/new?a=1"),
    ({"uri": {"regex": "/v[0-9]/.*"}}, {"uri": "/latest"}, "/v1/z", "/latest"),
    # a route without a uri match matched the prefix "/" (Envoy's reading of Istio's rewrite)
    ({}, {"uri": "/base/"}, "/x/y", "/base/x/y"),
    ({}, {"uri_regex": {"match": "^/svc/([^/]+)/(.*)$", "rewrite": "/\\2/\\1"}}, "/svc/a/b/c?q", "/b/c/a?q"),
    ({}, {"authority": "other:80"}, "/same?q", "/same?q"),
])
def test_rewrites(match: dict[str, Any], rewrite: dict[str, Any], path: str, expected: str) -> None:
    route = one_route(match, rewrite=rewrite).match(get("h", path))
    assert route is not None and route.rewrite is not None
    assert route.rewrite.path(path) == expected
    assert route.rewrite.authority == rewrite.get("authority")


@pytest.mark.parametrize(("redirect", "request_", "location"), [
    ({"uri": "/new"}, get("a.com:8080", "/old?x=1"), "http://a.com:8080/new?x=1"),
    ({"uri": "/new?y=2"}, get("a.com", "/old?x=1"), "http://a.com/new?y=2"),
    ({"authority": "b.com"}, get("a.com:8080", "/p"), "http://b.com/p"),
    ({"authority": "b.com:9000"}, get("a.com:8080", "/p"), "http://b.com:9000/p"),
    ({"scheme": "https"}, get("a.com:80", "/p?q"), "https://a.com/p?q"),
    ({"scheme": "https", "port": 8443}, get("a.com", "/p"), "https://a.com:8443/p"),
    ({"port": 443, "scheme": "https"}, get("a.com", "/p"), "https://a.com/p"),
    ({"authority": "b.com", "derive_port": "FROM_REQUEST_PORT"}, get("a.com:8080", "/p"), "http://b.com:8080/p"),
    ({"derive_port": "FROM_PROTOCOL_DEFAULT"}, get("a.com:8080", "/p"), "http://a.com/p"),
    ({"uri": "/x"}, get("[::1]:8080", "/p"), "http://[::1]:8080/x"),
    ({"authority": "[::2]"}, get("[::1]:8080", "/p"), "http://[::2]/p"),
    ({"prefix_rewrite": "/v2"}, get("a.com", "/v1/users?id=1"), "http://a.com/v2/users?id=1"),
])
def test_redirect_locations(redirect: dict[str, Any], request_: Request, location: str) -> None:
    route = one_route({"uri": {"prefix": "/v1"}} if "prefix_rewrite" in redirect else {},
                      redirect={**redirect, "redirect_code": 308}).match(request_)
    assert route is not None and route.redirect is not None
    assert route.redirect.location(request_) == location and route.redirect.code == 308


def test_zero_total_weight_picks_nothing() -> None:
    route = Route({"name": "r", "match": {}, "clusters": []})
    assert route.pick_cluster(0.5) is None


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("retry_on", "codes", "retried", "not_retried"), [
    (["5xx"], [], [500, 503, 599, CONNECT_FAILURE, RESET, REFUSED_STREAM, TIMEOUT], [404, 409, 200]),
    (["gateway-error"], [], [502, 503, 504, CONNECT_FAILURE, RESET, TIMEOUT], [500, 501, 409]),
    (["connect-failure"], [], [CONNECT_FAILURE], [RESET, TIMEOUT, REFUSED_STREAM, 503, 502]),
    (["reset"], [], [RESET, CONNECT_FAILURE, TIMEOUT, REFUSED_STREAM], [503, 500]),
    (["refused-stream"], [], [REFUSED_STREAM], [RESET, CONNECT_FAILURE, 503]),
    (["retriable-4xx"], [], [409], [404, 429, 500, CONNECT_FAILURE]),
    (["retriable-status-codes"], [429, 503], [429, 503], [500, 502, RESET]),
    ([], [], [], [500, 503, CONNECT_FAILURE, RESET]),
])
def test_retry_on(retry_on: list[str], codes: list[int], retried: list[int | str],
                  not_retried: list[int | str]) -> None:
    policy = RetryPolicy({"attempts": 2, "retry_on": retry_on, "retriable_status_codes": codes})

    def retries(outcome: int | str, done: int = 0) -> bool:
        if isinstance(outcome, str):
            return policy.should_retry(done, failure=outcome)
        return policy.should_retry(done, status=outcome)

    assert [o for o in retried if retries(o)] == retried
    assert [o for o in not_retried if retries(o)] == []
    assert not any(retries(o, done=2) for o in retried)  # attempts are retries after the first try
    assert not policy.should_retry(0, failure="overflow")  # a local circuit breaker never retries


def test_backoff_is_jittered_exponential_from_25ms_capped_at_ten_times() -> None:
    policy = RetryPolicy({"attempts": 10, "retry_on": ["5xx"]})
    bounds = [25, 50, 100, 200, 250, 250, 250]
    assert [policy.backoff_ms(n, 0.9999) for n in range(1, 8)] == [b - 1 for b in bounds]
    assert {policy.backoff_ms(n, 0.0) for n in range(1, 8)} == {0}
    assert policy.backoff_ms(100, 0.5) == 125
    rng = random.Random(5)
    waits = [policy.backoff_ms(3, rng.random()) for _ in range(10_000)]
    assert min(waits) >= 0 and max(waits) <= 99
    assert 47 <= sum(waits) / len(waits) <= 52  # uniform on [0, 100): mean 49.5
    assert len(set(waits)) == 100
    custom = RetryPolicy({"attempts": 3, "retry_on": ["5xx"], "backoff_ms": 100})
    assert [custom.backoff_ms(n, 0.9999) for n in (1, 2, 3, 4, 5, 6)] == [99, 199, 399, 799, 999, 999]


# --- compile once --------------------------------------------------------------------------------


def test_unchanged_route_configs_are_kept_across_config_updates() -> None:
    first = build_route_configs(config([]))
    again = build_route_configs(config([]), first)
    assert again["9080"] is first["9080"]
    res = resources(vs("reviews", "  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}]}]"))
    changed = build_route_configs(config(res), first)
    assert changed["9080"] is not first["9080"]
    assert changed["9080"].match(get(REVIEWS)).virtual_service == "default/reviews"


def test_request_query_is_decoded_once_and_first_value_wins() -> None:
    r = Request("GET", "/p?a=1&b=x%2Fy&a=2&empty=&bare", "h")
    assert r.uri == "/p" and r.query == {"a": "1", "b": "x/y", "empty": "", "bare": ""}
    assert r.query is r.query
    assert Request("GET", "/p", "h").query == {}
