"""Translation of Istio config into per-proxy config: every part of the schema in
controlplane.pilot.networking, on bookinfo's samples and on small inline configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest

from controlplane.config.model import Resource
from controlplane.config.validate import load_paths, load_text
from controlplane.pilot.model import Endpoint, Port, Protocol, Proxy, Service
from controlplane.pilot.networking import PushContext, build_proxy_config, config_hash

NS = "default"
BOOKINFO = ("details", "ratings", "reviews", "productpage")
VERSIONS = {"reviews": ("v1", "v2", "v3")}


def host(name: str, ns: str = NS) -> str:
    return f"{name}.{ns}.svc.cluster.local"


def http(number: int = 9080) -> Port:
    return Port("http", number, Protocol.HTTP)


def service(name: str, ns: str = NS, ports: list[Port] | None = None, **kw: Any) -> Service:
    return Service(host(name, ns), ns, ports or [http()], name=name, selector={"app": name}, **kw)


def bookinfo() -> tuple[list[Service], list[Endpoint]]:
    services, endpoints = [], []
    for i, name in enumerate(BOOKINFO):
        services.append(service(name, addresses=[f"10.96.0.{i + 1}"]))
        for j, version in enumerate(VERSIONS.get(name, ("v1",))):
            endpoints.append(Endpoint(host(name), f"10.1.{i}.{j + 1}", 9080, 9080,
                                      {"app": name, "version": version}, service_account=f"bookinfo-{name}"))
    return services, endpoints


def resources(*texts: str) -> list[Resource]:
    out: list[Resource] = []
    for text in texts:
        result = load_text(text)
        assert not result.errors, result.errors
        out += result.resources
    return out


def files(*paths: Path) -> list[Resource]:
    result = load_paths(list(paths))
    assert not result.errors, result.errors
    return result.resources


def push_of(res: list[Resource], services: list[Service] | None = None,
            endpoints: list[Endpoint] | None = None, mesh: dict[str, Any] | None = None) -> PushContext:
    if services is None:
        services, default_endpoints = bookinfo()
        endpoints = default_endpoints if endpoints is None else endpoints
    return PushContext(services, endpoints or [], res, mesh)


def proxy(app: str = "productpage", version: str = "v1", ns: str = NS, ip: str = "10.1.3.1",
          **labels: str) -> Proxy:
    return Proxy(f"{app}-{version}.{ns}", ns, ip, {"app": app, "version": version, **labels})


def config(res: list[Resource], who: Proxy | None = None, **kw: Any) -> dict[str, Any]:
    return build_proxy_config(push_of(res, **kw), who or proxy())


def vhost(cfg: dict[str, Any], hostname: str, port: int = 9080) -> dict[str, Any]:
    [found] = [v for v in cfg["routes"][str(port)]["virtual_hosts"] if v.get("service") == hostname]
    return found


def routes(cfg: dict[str, Any], name: str, port: int = 9080) -> list[dict[str, Any]]:
    return vhost(cfg, host(name), port)["routes"]


def istio(kind: str, name: str, body: str, ns: str = NS, group: str = "networking.istio.io") -> str:
    return f"apiVersion: {group}/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"


def vs(name: str, body: str, ns: str = NS) -> str:
    return istio("VirtualService", name, body, ns)


def dr(name: str, body: str, ns: str = NS) -> str:
    return istio("DestinationRule", name, body, ns)


def sidecar(name: str, body: str, ns: str = NS) -> str:
    return istio("Sidecar", name, body, ns)


# --- bookinfo samples --------------------------------------------------------------------------


def test_reviews_80_20_splits_by_weight_across_subsets(istio_testdata: Path) -> None:
    b = istio_testdata / "bookinfo"
    cfg = config(files(b / "virtual-service-reviews-80-20.yaml", b / "destination-rule-all.yaml"))
    [route] = routes(cfg, "reviews")
    assert route["match"] == {}
    assert route["clusters"] == [
        {"name": f"outbound|9080|v1|{host('reviews')}", "weight": 80},
        {"name": f"outbound|9080|v2|{host('reviews')}", "weight": 20},
    ]
    assert {c["name"] for c in route["clusters"]} <= set(cfg["clusters"])


def test_reviews_jason_goes_to_v2_everyone_else_to_v3(istio_testdata: Path) -> None:
    cfg = config(files(istio_testdata / "bookinfo" / "virtual-service-reviews-jason-v2-v3.yaml"))
    first, second = routes(cfg, "reviews")
    assert first["match"] == {"headers": {"end-user": {"exact": "jason"}}}
    assert first["clusters"] == [{"name": f"outbound|9080|v2|{host('reviews')}", "weight": 100}]
    assert second["match"] == {}
    assert second["clusters"] == [{"name": f"outbound|9080|v3|{host('reviews')}", "weight": 100}]
    assert first["virtual_service"] == "default/reviews"


def test_details_fault_aborts_every_request_with_555(istio_testdata: Path) -> None:
    cfg = config(files(istio_testdata / "bookinfo" / "fault-injection-details-v1.yaml"))
    # the file's second rule sits behind a catch-all, so it can never match (Istio drops it too)
    [route] = routes(cfg, "details")
    assert route["fault"] == {"abort": {"http_status": 555, "percentage": 100.0}}
    assert route["clusters"] == [{"name": f"outbound|9080|v1|{host('details')}", "weight": 100}]
    assert cfg["clusters"][f"outbound|9080|v1|{host('details')}"]["subset_labels"] == {"version": "v1"}


def test_destination_rule_all_makes_subset_clusters_with_filtered_endpoints(istio_testdata: Path) -> None:
    cfg = config(files(istio_testdata / "bookinfo" / "destination-rule-all.yaml"))
    for version in ("v1", "v2", "v3"):
        name = f"outbound|9080|{version}|{host('reviews')}"
        cluster = cfg["clusters"][name]
        assert cluster["subset"] == version and cluster["subset_labels"] == {"version": version}
        assert cluster["destination_rule"] == "default/reviews"
        [ep] = cfg["endpoints"][name]
        assert ep["labels"]["version"] == version and ep["port"] == 9080
    assert len(cfg["endpoints"][f"outbound|9080||{host('reviews')}"]) == 3
    assert cfg["endpoints"][f"outbound|9080|v2-mysql|{host('ratings')}"] == []  # no such pods
    # no VirtualService: every host keeps its default route to the whole service
    [route] = routes(cfg, "reviews")
    assert route["name"] == "default" and route["clusters"][0]["name"] == f"outbound|9080||{host('reviews')}"


# --- listeners ---------------------------------------------------------------------------------


def test_outbound_listeners_one_per_service_port_by_protocol() -> None:
    services, endpoints = bookinfo()
    services.append(service("mongo", ports=[Port("tcp-mongo", 27017, Protocol.TCP)], addresses=["10.96.1.1"]))
    services.append(service("web", ports=[Port("web", 8000, Protocol.UNKNOWN)]))
    cfg = config([], services=services, endpoints=endpoints)
    listeners = {li["name"]: li for li in cfg["listeners"]["outbound"]}
    assert [li["port"] for li in cfg["listeners"]["outbound"]] == [8000, 9080, 9080, 9080, 9080, 27017]
    reviews = listeners[f"{host('reviews')}_9080"]
    assert reviews == {"name": f"{host('reviews')}_9080", "service": host("reviews"),
                       "addresses": ["10.96.0.3"], "port": 9080, "protocol": "HTTP", "route_config": "9080",
                       "http": {"upgrade_types": ["websocket"]}}
    mongo = listeners[f"{host('mongo')}_27017"]
    assert "route_config" not in mongo and "http" not in mongo
    assert mongo["tcp_routes"] == [{"match": {}, "clusters": [{"name": f"outbound|27017||{host('mongo')}",
                                                               "weight": 100}]}]
    sniffed = listeners[f"{host('web')}_8000"]  # UNKNOWN: routed as HTTP if it turns out to be, else TCP
    assert sniffed["route_config"] == "8000" and sniffed["tcp_routes"]
    assert set(cfg["routes"]) == {"8000", "9080"}
    assert cfg["listeners"]["outbound_traffic_policy"] == "ALLOW_ANY"


def test_tcp_and_tls_routes_from_virtual_service() -> None:
    services = [service("db", ports=[Port("tcp", 3306, Protocol.TCP)]),
                service("api", ports=[Port("tls", 443, Protocol.TLS)])]
    res = resources(
        vs("db", """  hosts: [db]
  tcp:
  - match: [{port: 3306, sourceLabels: {app: other}}]
    route: [{destination: {host: db, subset: canary}}]
  - match: [{destinationSubnets: [10.0.0.0/8]}]
    route:
    - {destination: {host: db, subset: v1}, weight: 70}
    - {destination: {host: db, subset: v2}, weight: 30}
"""),
        vs("api", """  hosts: [api.default.svc.cluster.local]
  tls:
  - match: [{sniHosts: [api.default.svc.cluster.local]}]
    route: [{destination: {host: api, subset: v2}}]
"""))
    cfg = config(res, services=services)
    listeners = {li["service"]: li for li in cfg["listeners"]["outbound"]}
    db = listeners[host("db")]["tcp_routes"]
    assert db == [
        {"match": {"destination_subnets": ["10.0.0.0/8"]},
         "clusters": [{"name": f"outbound|3306|v1|{host('db')}", "weight": 70},
                      {"name": f"outbound|3306|v2|{host('db')}", "weight": 30}]},
        {"match": {}, "clusters": [{"name": f"outbound|3306||{host('db')}", "weight": 100}]},
    ]
    api = listeners[host("api")]["tcp_routes"]
    assert api[0] == {"match": {"sni_hosts": [host("api")]},
                      "clusters": [{"name": f"outbound|443|v2|{host('api')}", "weight": 100}]}


def test_inbound_listeners_carry_protocol_and_per_port_mtls() -> None:
    services = [service("reviews", ports=[http(), Port("grpc", 9090, Protocol.GRPC, target_port=19090)])]
    endpoints = [Endpoint(host("reviews"), "10.1.0.1", 9080, 9080, {"app": "reviews", "version": "v1"})]
    res = resources("""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
  portLevelMtls:
    19090: {mode: PERMISSIVE}
""")
    cfg = config(res, proxy("reviews", ip="10.1.0.1"), services=services, endpoints=endpoints)
    assert cfg["listeners"]["inbound"] == [
        {"name": "inbound_9080", "port": 9080, "protocol": "HTTP", "mtls_mode": "STRICT",
         "cluster": "inbound|9080||", "services": [{"service": host("reviews"), "port": 9080}],
         "http": {"upgrade_types": ["websocket"]}},
        {"name": "inbound_19090", "port": 19090, "protocol": "GRPC", "mtls_mode": "PERMISSIVE",
         "cluster": "inbound|19090||", "services": [{"service": host("reviews"), "port": 9090}],
         "http": {"upgrade_types": ["websocket"]}},
    ]
    assert cfg["clusters"]["inbound|19090||"]["direction"] == "inbound"
    assert cfg["endpoints"]["inbound|19090||"][0]["address"] == "127.0.0.1"
    assert cfg["security"]["mtls"] == {"mode": "STRICT", "ports": {"19090": "PERMISSIVE"}}
    # a proxy whose workload serves nothing has no inbound side
    assert config(res, proxy("sleep"), services=services, endpoints=endpoints)["listeners"]["inbound"] == []


def test_inbound_found_by_address_when_labels_do_not_select() -> None:
    services, endpoints = bookinfo()
    services = [Service(s.hostname, s.namespace, s.ports, name=s.name) for s in services]  # no selectors
    cfg = config([], Proxy("x", NS, "10.1.2.2", {}), services=services, endpoints=endpoints)
    [inbound] = cfg["listeners"]["inbound"]
    assert inbound["services"] == [{"service": host("reviews"), "port": 9080}]


# --- routes: matches ----------------------------------------------------------------------------


def test_http_matches_translate_every_request_condition() -> None:
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
    first, second, last = routes(config(res), "reviews")
    assert first["name"] == "everything"
    assert first["match"] == {
        "uri": {"prefix": "/api"}, "ignore_uri_case": True, "method": {"exact": "GET"},
        "authority": {"regex": "rev.*"},
        "headers": {"x-env": {"prefix": "prod"}, "x-trace": {"present": True}},
        "query_params": {"debug": {"exact": "1"}, "flag": {"present": True}},
        "without_headers": {"x-skip": {"exact": "yes"}},
    }
    assert second["match"] == {"uri": {"regex": "^/v[0-9]+/.*"}}  # each match is its own route, in order
    assert second["clusters"] == first["clusters"]
    assert last["match"] == {} and last["clusters"][0]["name"] == f"outbound|9080|v1|{host('reviews')}"


def test_caller_conditions_are_settled_per_proxy() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}, headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{sourceNamespace: other}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{port: 9999}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{gateways: [istio-system/ingress]}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""))
    push = push_of(res)
    mine = build_proxy_config(push, proxy("productpage"))
    first, last = routes(mine, "reviews")
    assert first["match"] == {"headers": {"end-user": {"exact": "jason"}}}  # source labels resolved away
    assert last["clusters"][0]["name"].startswith("outbound|9080|v1|")
    # another workload never sees the productpage-only route
    [only] = routes(build_proxy_config(push, proxy("ratings")), "reviews")
    assert only["clusters"][0]["name"].startswith("outbound|9080|v1|")
    # the sourceNamespace route applies in its namespace (where `reviews` is no longer a short name)
    other = build_proxy_config(push, proxy("sleep", ns="other"))
    assert routes(other, "reviews")[0]["clusters"][0]["name"].startswith("outbound|9080|v3|")
    assert "reviews" not in vhost(other, host("reviews"))["domains"]


def test_source_label_match_that_fires_becomes_a_catch_all() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""))
    [route] = routes(config(res), "reviews")
    assert route["match"] == {} and route["clusters"][0]["name"].startswith("outbound|9080|v2|")


def test_no_applicable_rule_falls_back_to_the_default_route() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: nobody}}]
    route: [{destination: {host: reviews, subset: v2}}]
"""))
    [route] = routes(config(res), "reviews")
    assert route["name"] == "default"


def test_gateway_bound_virtual_service_does_not_route_sidecars() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"""), vs("ratings", """  hosts: [ratings]
  gateways: [bookinfo-gateway, mesh]
  http: [{route: [{destination: {host: ratings, subset: v2}}]}]
"""))
    push = push_of(res)
    assert set(push.virtual_services_by_gateway) == {"mesh", "default/bookinfo-gateway"}
    cfg = build_proxy_config(push, proxy())
    assert routes(cfg, "reviews")[0]["name"] == "default"
    assert routes(cfg, "ratings")[0]["clusters"][0]["name"].startswith("outbound|9080|v2|")


def test_virtual_host_domains_and_fallbacks() -> None:
    cfg = config([])
    assert vhost(cfg, host("reviews"))["domains"] == [
        host("reviews"), f"{host('reviews')}:9080", "reviews.default.svc", "reviews.default.svc:9080",
        "reviews.default", "reviews.default:9080", "reviews", "reviews:9080", "10.96.0.3", "10.96.0.3:9080"]
    last = cfg["routes"]["9080"]["virtual_hosts"][-1]
    assert last["domains"] == ["*"] and last["routes"][0]["clusters"][0]["name"] == "PassthroughCluster"
    assert "PassthroughCluster" in cfg["clusters"] and "PassthroughCluster" not in cfg["endpoints"]


# --- routes: actions ----------------------------------------------------------------------------


def test_http_route_actions() -> None:
    res = resources(vs("reviews", """  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /slow}}]
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,connect-failure,503"}
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percentage: {value: 10}}
    mirror: {host: ratings}
    mirrorPercentage: {value: 25}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {remove: [server]}
    rewrite: {uri: /fast, authority: reviews.internal}
    corsPolicy: {allowOrigins: [{exact: "https://example.com"}], allowMethods: [GET], maxAge: 24h}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
      headers: {request: {set: {x-subset: v1}}}
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 10
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: example.com}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {string: gone}}
  - match: [{uri: {exact: /no-retries}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
"""))
    # no catch-all rule: unmatched requests get no route (a 404), as in Istio
    slow, old, gone, no_retries = routes(config(res), "reviews")
    assert slow["timeout_ms"] == 1500
    assert slow["retries"] == {"attempts": 3, "per_try_timeout_ms": 500,
                               "retry_on": ["gateway-error", "connect-failure", "retriable-status-codes"],
                               "retriable_status_codes": [503]}
    assert slow["fault"] == {"delay": {"fixed_delay_ms": 7000, "percentage": 12.5},
                             "abort": {"http_status": 503, "percentage": 10.0}}
    assert slow["mirrors"] == [{"cluster": f"outbound|9080||{host('ratings')}", "percentage": 25.0}]
    assert slow["headers"] == {"request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
                               "response": {"remove": ["server"]}}
    assert slow["clusters"][0]["headers"] == {"request": {"set": {"x-subset": "v1"}}}
    assert [c["weight"] for c in slow["clusters"]] == [90, 10]
    assert slow["rewrite"] == {"uri": "/fast", "authority": "reviews.internal"}
    assert slow["cors"]["allowMethods"] == ["GET"]
    assert old["redirect"] == {"uri": "/new", "authority": "example.com", "redirect_code": 301}
    assert "clusters" not in old and "retries" not in old
    assert gone["direct_response"] == {"status": 410, "body": "gone"}
    assert no_retries["retries"] == {"attempts": 0}
    assert no_retries["clusters"] == [{"name": f"outbound|9080||{host('reviews')}", "weight": 100}]


def test_destination_port_follows_the_listener_for_multi_port_services() -> None:
    services = [service("web", ports=[http(80), http(8080)]), service("one", ports=[http(9000)])]
    res = resources(vs("web", """  hosts: [web]
  http: [{route: [{destination: {host: web}, weight: 50}, {destination: {host: one}, weight: 50}]}]
"""))
    cfg = config(res, services=services)
    assert [c["name"] for c in routes(cfg, "web", 8080)[0]["clusters"]] == [
        f"outbound|8080||{host('web')}", f"outbound|9000||{host('one')}"]


# --- clusters -----------------------------------------------------------------------------------


def test_traffic_policy_merges_with_istio_precedence() -> None:
    services = [service("reviews", ports=[http(9080), http(9443)])]
    res = resources(dr("reviews", """  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 20, maxRequestsPerConnection: 1, maxRetries: 3,
             idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5s, baseEjectionTime: 1m}
    portLevelSettings:
    - port: {number: 9443}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: user, ttl: 10s, path: /}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        outlierDetection: {consecutiveGatewayErrors: 2}
"""))
    clusters = config(res, services=services)["clusters"]
    base = clusters[f"outbound|9080||{host('reviews')}"]
    assert base["lb"] == {"simple": "ROUND_ROBIN"}
    assert base["connection_pool"] == {
        "tcp": {"max_connections": 100, "connect_timeout_ms": 250},
        "http": {"http1_max_pending_requests": 10, "http2_max_requests": 20, "max_requests_per_connection": 1,
                 "max_retries": 3, "idle_timeout_ms": 30000}}
    assert base["outlier_detection"] == {"consecutive_5xx_errors": 7, "consecutive_gateway_errors": 0,
                                         "interval_ms": 5000, "base_ejection_time_ms": 60000,
                                         "max_ejection_percent": 10, "min_health_percent": 0}
    # port-level settings replace all of the rule's settings for that port (they do not inherit)
    port_level = clusters[f"outbound|9443||{host('reviews')}"]
    assert port_level["lb"] == {"simple": "RANDOM"} and "outlier_detection" not in port_level
    assert port_level["connection_pool"] == {"tcp": {"connect_timeout_ms": 10000}, "http": {}}
    # a subset field replaces the rule's field, the rest is inherited
    v1 = clusters[f"outbound|9080|v1|{host('reviews')}"]
    assert v1["lb"] == {"consistent_hash": {"http_cookie": {"name": "user", "path": "/", "ttl_ms": 10000}}}
    assert v1["connection_pool"] == base["connection_pool"]
    v2 = clusters[f"outbound|9080|v2|{host('reviews')}"]
    assert v2["outlier_detection"]["consecutive_gateway_errors"] == 2
    assert v2["lb"] == {"simple": "LEAST_REQUEST"}
    assert clusters[f"outbound|9443|v2|{host('reviews')}"]["lb"] == {"simple": "RANDOM"}


@pytest.mark.parametrize(("hashing", "expected"), [
    ("{httpHeaderName: x-user}", {"http_header_name": "x-user"}),
    ("{useSourceIp: true, minimumRingSize: 1024}", {"use_source_ip": True, "minimum_ring_size": 1024}),
    ("{httpQueryParameterName: session}", {"http_query_parameter_name": "session"}),
])
def test_consistent_hash_keys(hashing: str, expected: dict[str, Any]) -> None:
    res = resources(dr("reviews", f"  host: reviews\n  trafficPolicy:\n    loadBalancer:\n"
                                  f"      consistentHash: {hashing}\n"))
    assert config(res)["clusters"][f"outbound|9080||{host('reviews')}"]["lb"] == {"consistent_hash": expected}


def test_auto_mtls_for_in_mesh_destinations() -> None:
    services, endpoints = bookinfo()
    services.append(Service("api.example.com", NS, [Port("https", 443, Protocol.TLS)], resolution="DNS",
                            mesh_external=True))
    cfg = config([], services=services, endpoints=endpoints)
    reviews = cfg["clusters"][f"outbound|9080||{host('reviews')}"]
    assert reviews["tls"] == {"mode": "ISTIO_MUTUAL", "auto": True,
                              "sni": f"outbound_.9080_._.{host('reviews')}",
                              "subject_alt_names": ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]}
    assert cfg["clusters"]["outbound|443||api.example.com"]["tls"] == {"mode": "DISABLE"}
    assert cfg["clusters"]["outbound|443||api.example.com"]["type"] == "STRICT_DNS"
    # a DNS ServiceEntry without endpoints is reached at its own name
    [ep] = cfg["endpoints"]["outbound|443||api.example.com"]
    assert (ep["address"], ep["port"], ep["tls_mode"]) == ("api.example.com", 443, "disabled")
    assert cfg["endpoints"][f"outbound|9080||{host('reviews')}"][0]["tls_mode"] == "istio"


def test_auto_mtls_off_where_the_destination_namespace_disables_mtls_or_the_mesh_does() -> None:
    disable = resources("""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: DISABLE}}
""")
    assert config(disable)["clusters"][f"outbound|9080||{host('reviews')}"]["tls"] == {"mode": "DISABLE"}
    off = config([], mesh={"enableAutoMtls": False})
    assert off["clusters"][f"outbound|9080||{host('reviews')}"]["tls"] == {"mode": "DISABLE"}


def test_destination_rule_tls_wins_over_auto_mtls(istio_testdata: Path) -> None:
    cfg = config(files(istio_testdata / "bookinfo" / "destination-rule-all-mtls.yaml"))
    tls = cfg["clusters"][f"outbound|9080|v2|{host('reviews')}"]["tls"]
    assert tls["mode"] == "ISTIO_MUTUAL" and tls["auto"] is False
    assert tls["sni"] == f"outbound_.9080_.v2_.{host('reviews')}"
    res = resources(dr("ratings", """  host: ratings
  trafficPolicy:
    tls: {mode: SIMPLE, sni: ratings.example.com, caCertificates: /etc/ca.pem}
  subsets:
  - name: plain
    labels: {version: v1}
    trafficPolicy: {tls: {mode: DISABLE}}
"""))
    clusters = config(res)["clusters"]
    assert clusters[f"outbound|9080||{host('ratings')}"]["tls"] == {
        "mode": "SIMPLE", "sni": "ratings.example.com", "ca_certificates": "/etc/ca.pem"}
    assert clusters[f"outbound|9080|plain|{host('ratings')}"]["tls"] == {"mode": "DISABLE"}


def test_destination_rule_lookup_order_and_export() -> None:
    services, endpoints = bookinfo()
    def rule(hostname: str, lb: str, extra: str = "") -> str:
        return f"  host: {hostname}\n  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}\n{extra}"

    res = resources(
        dr("mesh-wide", rule("'*.local'", "RANDOM"), ns="istio-system"),
        dr("owner", rule(host("reviews"), "ROUND_ROBIN")),
        dr("client", rule(host("reviews"), "PASSTHROUGH"), ns="client"),
        dr("private", rule("ratings", "ROUND_ROBIN", "  exportTo: ['.']\n")),
    )
    push = push_of(res, services, endpoints)

    def lb(who: Proxy, name: str) -> str:
        return build_proxy_config(push, who)["clusters"][f"outbound|9080||{host(name)}"]["lb"]["simple"]

    assert lb(proxy(), "reviews") == "ROUND_ROBIN"                       # the service's namespace
    assert lb(proxy(ns="client"), "reviews") == "PASSTHROUGH"            # the proxy's own namespace first
    assert lb(proxy(ns="elsewhere"), "reviews") == "ROUND_ROBIN"
    assert lb(proxy(ns="elsewhere"), "details") == "RANDOM"              # root namespace wildcard
    assert lb(proxy(), "ratings") == "ROUND_ROBIN"
    assert lb(proxy(ns="elsewhere"), "ratings") == "RANDOM"              # exportTo: . hides it


def test_workload_selected_destination_rule_applies_only_to_its_workloads() -> None:
    res = resources(dr("pp-only", """  host: reviews
  workloadSelector: {matchLabels: {app: productpage}}
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"""))
    push = push_of(res)
    name = f"outbound|9080||{host('reviews')}"
    assert build_proxy_config(push, proxy())["clusters"][name]["lb"] == {"simple": "RANDOM"}
    assert build_proxy_config(push, proxy("ratings"))["clusters"][name]["lb"] == {"simple": "LEAST_REQUEST"}


def test_wildcard_hosts_match_services() -> None:
    services = [Service("api.example.com", NS, [http(80)], resolution="DNS", mesh_external=True),
                Service("web.example.org", NS, [http(80)], resolution="DNS", mesh_external=True)]
    res = resources(vs("example", """  hosts: ["*.example.com"]
  http: [{timeout: 3s, route: [{destination: {host: api.example.com}}]}]
"""), dr("example", "  host: '*.example.com'\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}\n"))
    cfg = config(res, services=services)
    assert vhost(cfg, "api.example.com", 80)["routes"][0]["timeout_ms"] == 3000
    assert vhost(cfg, "web.example.org", 80)["routes"][0]["name"] == "default"
    assert cfg["clusters"]["outbound|80||api.example.com"]["lb"] == {"simple": "RANDOM"}
    assert cfg["clusters"]["outbound|80||web.example.org"]["lb"] == {"simple": "LEAST_REQUEST"}


# --- Sidecar scoping ------------------------------------------------------------------------------


def visible(cfg: dict[str, Any]) -> set[str]:
    return {li["service"] for li in cfg["listeners"]["outbound"]}


def test_sidecar_egress_limits_what_a_proxy_sees() -> None:
    services, endpoints = bookinfo()
    services += [service("cache", "infra"), service("istiod", "istio-system"), service("secret", "infra")]
    services.append(Service("api.example.com", "infra", [http(80)], resolution="DNS"))
    res = resources(
        sidecar("default", """  egress:
  - hosts: ["./*", "istio-system/*", "*/cache.infra.svc.cluster.local", "infra/*.example.com"]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""),
        sidecar("reviews", """  workloadSelector: {labels: {app: reviews}}
  egress: [{hosts: ["./ratings.default.svc.cluster.local"]}]
"""),
        sidecar("root", "  egress: [{hosts: ['~/*']}]\n", ns="istio-system"),
        sidecar("nothing-here", "  egress: [{hosts: ['./*']}]\n", ns="infra"),
    )
    push = push_of(res, services, endpoints)
    default_ns = build_proxy_config(push, proxy())
    imported = {host("cache", "infra"), host("istiod", "istio-system"), "api.example.com"}
    assert visible(default_ns) == {host(n) for n in BOOKINFO} | imported
    assert default_ns["listeners"]["outbound_traffic_policy"] == "REGISTRY_ONLY"
    fallback = default_ns["routes"]["9080"]["virtual_hosts"][-1]
    assert fallback["name"] == "block_all" and fallback["routes"][0]["direct_response"] == {"status": 502}
    reviews = build_proxy_config(push, proxy("reviews"))
    assert visible(reviews) == {host("ratings")}                       # the workload's own Sidecar wins
    assert push.sidecar_scope(proxy("reviews")).sidecar.name == "reviews"
    assert reviews["listeners"]["outbound_traffic_policy"] == "ALLOW_ANY"
    assert visible(build_proxy_config(push, proxy(ns="other"))) == set()  # the root namespace's default


def test_sidecar_egress_port_and_virtual_service_destinations() -> None:
    services, endpoints = bookinfo()
    services.append(service("multi", ports=[http(80), http(8080)]))
    res = resources(
        sidecar("default", """  egress:
  - port: {number: 8080, protocol: HTTP, name: web}
    hosts: [./multi.default.svc.cluster.local]
  - hosts: [./reviews.default.svc.cluster.local]
"""),
        vs("reviews", "  hosts: [reviews]\n  http: [{route: [{destination: {host: ratings}}]}]\n"))
    cfg = config(res, services=services, endpoints=endpoints)
    assert [(li["service"], li["port"]) for li in cfg["listeners"]["outbound"]] == [
        (host("multi"), 8080), (host("reviews"), 9080)]
    # ratings is not imported, but reviews' VirtualService sends traffic there: it gets a cluster
    assert f"outbound|9080||{host('ratings')}" in cfg["clusters"]
    assert f"outbound|9080||{host('details')}" not in cfg["clusters"]


def test_export_to_hides_services_and_virtual_services() -> None:
    services, endpoints = bookinfo()
    services.append(service("internal", export_to=["."]))
    res = resources(vs("reviews", "  hosts: [reviews]\n  exportTo: ['.']\n"
                                  "  http: [{route: [{destination: {host: reviews, subset: v3}}]}]\n"))
    push = push_of(res, services, endpoints)
    here, there = build_proxy_config(push, proxy()), build_proxy_config(push, proxy(ns="other"))
    assert host("internal") in visible(here) and host("internal") not in visible(there)
    assert routes(here, "reviews")[0]["clusters"][0]["name"].startswith("outbound|9080|v3|")
    assert routes(there, "reviews")[0]["name"] == "default"


# --- security -----------------------------------------------------------------------------------


PEER_AUTHN = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {ns}}}
spec: {spec}
"""


def test_peer_authentication_workload_over_namespace_over_mesh() -> None:
    res = resources(
        PEER_AUTHN.format(name="default", ns="istio-system", spec="{mtls: {mode: STRICT}}"),
        PEER_AUTHN.format(name="default", ns="legacy", spec="{mtls: {mode: PERMISSIVE}}"),
        PEER_AUTHN.format(name="ratings", ns="default", spec="{selector: {matchLabels: {app: ratings}}, "
                                                             "mtls: {mode: DISABLE}}"),
        PEER_AUTHN.format(name="reviews", ns="default", spec="{selector: {matchLabels: {app: reviews}}, "
                                                             "portLevelMtls: {9080: {mode: DISABLE}}}"),
    )
    push = push_of(res)

    def mtls(who: Proxy) -> dict[str, Any]:
        return build_proxy_config(push, who)["security"]["mtls"]

    assert mtls(proxy()) == {"mode": "STRICT", "ports": {}}
    assert mtls(proxy(ns="legacy")) == {"mode": "PERMISSIVE", "ports": {}}
    assert mtls(proxy("ratings")) == {"mode": "DISABLE", "ports": {}}
    assert mtls(proxy("reviews")) == {"mode": "STRICT", "ports": {"9080": "DISABLE"}}  # UNSET inherits
    assert config([])["security"]["mtls"] == {"mode": "PERMISSIVE", "ports": {}}


def test_authorization_policies_selecting_the_workload_in_evaluation_order() -> None:
    def policy(name: str, ns: str, spec: str) -> str:
        return istio("AuthorizationPolicy", name, f"  {spec}\n", ns, group="security.istio.io")

    res = resources(
        policy("allow-get", NS, "{selector: {matchLabels: {app: reviews}}, action: ALLOW, "
                                "rules: [{to: [{operation: {methods: [GET]}}]}]}"),
        policy("audit", NS, "{action: AUDIT, rules: [{}]}"),
        policy("deny-legacy", "istio-system",
               "{action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}"),
        policy("ext", NS, "{action: CUSTOM, provider: {name: opa}, rules: [{}]}"),
        policy("mesh-selected", "istio-system", "{selector: {matchLabels: {app: reviews}}, rules: [{}]}"),
        policy("ratings-only", NS, "{selector: {matchLabels: {app: ratings}}, action: DENY, rules: [{}]}"),
        policy("elsewhere", "other", "{action: DENY, rules: [{}]}"),
    )
    authz = config(res, proxy("reviews"))["security"]["authorization"]
    assert [(p["name"], p["action"]) for p in authz] == [
        ("default/ext", "CUSTOM"), ("istio-system/deny-legacy", "DENY"), ("default/allow-get", "ALLOW"),
        ("istio-system/mesh-selected", "ALLOW"), ("default/audit", "AUDIT")]
    assert authz[2]["rules"] == [{"to": [{"operation": {"methods": ["GET"]}}]}]
    assert authz[0]["provider"] == "opa"


# --- versions, determinism, serialisation, speed ----------------------------------------------------


def test_identical_proxies_share_a_version_and_labels_change_it(istio_testdata: Path) -> None:
    b = istio_testdata / "bookinfo"
    res = files(b / "destination-rule-all.yaml", b / "virtual-service-reviews-v3.yaml")
    res += resources(vs("ratings", """  hosts: [ratings]
  http:
  - match: [{sourceLabels: {app: reviews, version: v2}}]
    route: [{destination: {host: ratings, subset: v2}}]
  - route: [{destination: {host: ratings, subset: v1}}]
"""))
    push = push_of(res)

    def version(ip: str, **labels: str) -> str:
        cfg = build_proxy_config(push, Proxy(f"{ip}.default", NS, ip, labels))
        assert cfg["version"] == config_hash(cfg)
        return cfg["version"]

    v1 = version("10.1.2.1", app="reviews", version="v1")
    assert len(v1) == 64
    assert version("10.1.2.9", app="reviews", version="v1") == v1   # another replica, another address
    assert version("10.1.2.2", app="reviews", version="v2") != v1   # its labels pick another ratings route
    assert version("10.1.3.1", app="productpage", version="v1") != v1


def test_config_is_deterministic_and_serialisable(istio_testdata: Path) -> None:
    res = files(istio_testdata / "bookinfo")
    services, endpoints = bookinfo()
    first = build_proxy_config(PushContext(services, endpoints, res), proxy())
    random.Random(7).shuffle(res)
    random.Random(7).shuffle(endpoints)
    again = build_proxy_config(PushContext(list(reversed(services)), endpoints, res), proxy())
    assert again == first
    assert json.dumps(again) == json.dumps(first)  # same order, not only same content
    assert msgpack.unpackb(msgpack.packb(first)) == json.loads(json.dumps(first))
    assert first["version"] == config_hash(first)
    assert list(first) == ["listeners", "routes", "clusters", "endpoints", "security", "version"]


def test_a_thousand_proxies_share_builds() -> None:
    services, endpoints = [], []
    for n in range(50):
        svc = service(f"svc{n}", ns=f"ns{n % 5}", addresses=[f"10.96.1.{n}"])
        services.append(svc)
        endpoints += [Endpoint(svc.hostname, f"10.2.{n}.{i}", 9080, 9080,
                               {"app": svc.name, "version": f"v{i % 2}"}) for i in range(20)]
    res = resources(*(dr(f"svc{n}", f"  host: svc{n}\n  subsets: [{{name: v0, labels: {{version: v0}}}},"
                                    f" {{name: v1, labels: {{version: v1}}}}]\n", ns=f"ns{n % 5}")
                      for n in range(50)))
    proxies = [Proxy(f"p{i}", f"ns{i % 5}", f"10.2.{i % 50}.{i % 20}",
                     {"app": f"svc{i % 50}", "version": f"v{i // 50 % 2}"}) for i in range(1000)]
    push = PushContext(services, endpoints, res)
    versions = {build_proxy_config(push, p)["version"] for p in proxies}
    # the version label changes nothing these proxies are sent, so it changes no version either
    assert len(versions) == 50
