"""AuthorizationPolicy evaluation (dataplane.proxy.authz), sans-IO: Istio's matching and
evaluation order over principals, namespaces, addresses, operations and conditions, the TCP
reading of HTTP-only fields, and the configs the proxy must refuse."""

from __future__ import annotations

from typing import Any

import pytest

from dataplane.proxy.authz import ALLOW_ALL, Authz, Decision, PolicyError, compile_policies
from dataplane.proxy.http.pathnorm import normalize
from dataplane.proxy.runtime import ConfigError, compile_snapshot

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"
OTHER_TD = "spiffe://example.org/ns/default/sa/sleep"


def policy(action: str, *rules: dict[str, Any], name: str = "default/p") -> dict[str, Any]:
    return {"name": name, "action": action, "rules": list(rules)}


def authz(*policies: dict[str, Any]) -> Authz:
    return compile_policies(list(policies))


def http(a: Authz, *, ip: str = "10.0.0.1", principal: str = "", port: int = 8080, method: str = "GET",
         path: str = "/", host: str = "svc", headers: dict[str, str] | None = None) -> bool:
    return a.check_http(ip, principal, port, method, path, host, headers or {}).allowed


def tcp(a: Authz, *, ip: str = "10.0.0.1", principal: str = "", port: int = 8080) -> bool:
    return a.check_tcp(ip, principal, port).allowed


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


# --- evaluation order and empty policies -------------------------------------------------------

def test_no_policy_allows_everything_without_looking() -> None:
    assert compile_policies(None) is ALLOW_ALL and compile_policies([]) is ALLOW_ALL
    assert not ALLOW_ALL.active
    assert ALLOW_ALL.check_http("not an ip", "", 0, "GET", "/", "h", {}) == Decision(True)
    assert tcp(ALLOW_ALL)


def test_rules_absent_or_empty() -> None:
    # ALLOW without rules: the workload has an ALLOW policy that nothing matches -> deny all
    assert not http(authz({"name": "default/none", "action": "ALLOW"}))
    assert not http(authz(policy("ALLOW")))
    assert not tcp(authz(policy("ALLOW")))
    # DENY without rules matches nothing -> allow
    assert http(authz(policy("DENY"))) and tcp(authz(policy("DENY")))
    # a rule {} matches everything
    assert http(authz(policy("ALLOW", {}))) and tcp(authz(policy("ALLOW", {})))
    assert not http(authz(policy("DENY", {}))) and not tcp(authz(policy("DENY", {})))
    # action defaults to ALLOW
    assert http(authz({"name": "default/p", "rules": [{}]}))


def test_deny_wins_over_allow_and_any_allow_suffices() -> None:
    a = authz(policy("DENY", src(namespaces=["ops"]), name="default/deny-ops"),
              policy("ALLOW", op(paths=["/a"]), name="default/a"),
              policy("ALLOW", op(paths=["/b"]), name="default/b"))
    assert a.check_http("10.0.0.1", ADMIN, 80, "GET", "/a", "svc", {}) == Decision(False, "default/deny-ops")
    assert a.check_http("10.0.0.1", SLEEP, 80, "GET", "/a", "svc", {}) == Decision(True, "default/a")
    assert a.check_http("10.0.0.1", SLEEP, 80, "GET", "/b", "svc", {}) == Decision(True, "default/b")
    assert a.check_http("10.0.0.1", SLEEP, 80, "GET", "/c", "svc", {}) == Decision(False, "")


def test_audit_marks_but_never_decides() -> None:
    a = authz(policy("AUDIT", op(paths=["/secret*"]), name="default/audit"))
    assert a.active
    assert a.check_http("10.0.0.1", "", 80, "GET", "/secret/x", "svc", {}) == Decision(True, "",
                                                                                        "default/audit")
    assert a.check_http("10.0.0.1", "", 80, "GET", "/public", "svc", {}) == Decision(True)
    both = authz(policy("DENY", op(methods=["DELETE"]), name="default/deny"),
                 policy("AUDIT", {}, name="default/audit-all"))
    assert both.check_http("1.1.1.1", "", 80, "DELETE", "/", "h", {}) == Decision(False, "default/deny",
                                                                                   "default/audit-all")
    assert both.check_tcp("1.1.1.1", "", 80) == Decision(False, "default/deny", "default/audit-all")


# --- sources ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "values", "principal", "expected"), [
    ("principals", ["cluster.local/ns/default/sa/sleep"], SLEEP, True),
    ("principals", ["cluster.local/ns/default/sa/sleep"], ADMIN, False),
    ("principals", ["cluster.local/ns/default/sa/sleep"], "", False),  # plain text: no identity
    ("principals", ["*"], SLEEP, True),  # any authenticated peer
    ("principals", ["*"], "", False),
    ("principals", ["cluster.local/ns/default/*"], SLEEP, True),  # prefix
    ("principals", ["*/sa/admin"], ADMIN, True),  # suffix
    ("principals", ["*/sa/admin"], SLEEP, False),
    ("notPrincipals", ["cluster.local/ns/default/sa/sleep"], SLEEP, False),
    ("notPrincipals", ["cluster.local/ns/default/sa/sleep"], ADMIN, True),
    ("notPrincipals", ["*"], "", True),  # not authenticated
    ("namespaces", ["default"], SLEEP, True),
    ("namespaces", ["default"], ADMIN, False),
    ("namespaces", ["default", "ops"], ADMIN, True),
    ("namespaces", ["def*"], SLEEP, True),
    ("namespaces", ["default"], "", False),
    ("namespaces", ["default"], "spiffe://cluster.local/not/a/workload/id", False),
    ("notNamespaces", ["ops"], SLEEP, True),
    ("notNamespaces", ["ops"], ADMIN, False),
    ("serviceAccounts", ["default/sleep"], SLEEP, True),
    ("serviceAccounts", ["sleep"], SLEEP, True),  # the policy's own namespace (default)
    ("serviceAccounts", ["sleep"], "spiffe://cluster.local/ns/ops/sa/sleep", False),
    ("notServiceAccounts", ["ops/admin"], ADMIN, False),
    ("trustDomains", ["cluster.local"], SLEEP, True),
    ("trustDomains", ["cluster.local"], OTHER_TD, False),
    ("notTrustDomains", ["example.*"], OTHER_TD, False),
])
def test_source_identity(field: str, values: list[str], principal: str, expected: bool) -> None:
    a = authz(policy("ALLOW", src(**{field: values})))
    assert http(a, principal=principal) is expected
    assert tcp(a, principal=principal) is expected  # identity fields apply to TCP too
    d = authz(policy("DENY", src(**{field: values})))
    assert http(d, principal=principal) is not expected


def test_principals_are_compared_without_spiffe_scheme() -> None:
    a = authz(policy("ALLOW", src(principals=["spiffe://cluster.local/ns/default/sa/sleep"])))
    assert not http(a, principal=SLEEP)  # Istio writes principals without the scheme
    assert http(a, principal="spiffe://spiffe://cluster.local/ns/default/sa/sleep")


@pytest.mark.parametrize(("field", "values", "ip", "expected"), [
    ("ipBlocks", ["10.0.0.0/8"], "10.1.2.3", True),
    ("ipBlocks", ["10.0.0.0/8"], "192.168.0.1", False),
    ("ipBlocks", ["192.168.0.1"], "192.168.0.1", True),  # a single address
    ("ipBlocks", ["192.168.0.1"], "192.168.0.2", False),
    ("ipBlocks", ["10.0.0.1/8"], "10.9.9.9", True),  # host bits allowed, as Istio does
    ("ipBlocks", ["fd00::/8"], "fd00::1", True),
    ("ipBlocks", ["fd00::/8"], "10.0.0.1", False),  # other family
    ("ipBlocks", ["10.0.0.0/8"], "not-an-ip", False),
    ("notIpBlocks", ["127.0.0.0/8"], "127.0.0.1", False),
    ("notIpBlocks", ["127.0.0.0/8"], "10.0.0.1", True),
    ("remoteIpBlocks", ["10.0.0.0/8"], "10.1.2.3", True),  # no XFF: the peer address
    ("notRemoteIpBlocks", ["10.0.0.0/8"], "10.1.2.3", False),
])
def test_source_addresses(field: str, values: list[str], ip: str, expected: bool) -> None:
    a = authz(policy("ALLOW", src(**{field: values})))
    assert http(a, ip=ip) is expected
    assert tcp(a, ip=ip) is expected


def test_fields_and_within_a_source_or_across_from_entries() -> None:
    both = authz(policy("ALLOW", src(namespaces=["default"], ipBlocks=["10.0.0.0/8"])))
    assert http(both, principal=SLEEP, ip="10.0.0.5")
    assert not http(both, principal=SLEEP, ip="11.0.0.5")
    assert not http(both, principal=ADMIN, ip="10.0.0.5")
    either = authz(policy("ALLOW", {"from": [{"source": {"namespaces": ["default"]}},
                                             {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}))
    assert http(either, principal=SLEEP, ip="11.0.0.5")
    assert http(either, principal=ADMIN, ip="10.0.0.5")
    assert not http(either, principal=ADMIN, ip="11.0.0.5")
    positive_and_negative = authz(policy("ALLOW", src(namespaces=["default"],
                                                      notPrincipals=["cluster.local/ns/default/sa/sleep"])))
    assert not http(positive_and_negative, principal=SLEEP)
    assert http(positive_and_negative, principal="spiffe://cluster.local/ns/default/sa/curl")


# --- operations ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "values", "request_", "expected"), [
    ("methods", ["GET", "HEAD"], {"method": "GET"}, True),
    ("methods", ["GET", "HEAD"], {"method": "POST"}, False),
    ("methods", ["GET"], {"method": "get"}, False),  # methods are case-sensitive
    ("notMethods", ["DELETE"], {"method": "DELETE"}, False),
    ("notMethods", ["DELETE"], {"method": "GET"}, True),
    ("paths", ["/api/v1"], {"path": "/api/v1"}, True),  # exact
    ("paths", ["/api/v1"], {"path": "/api/v1/x"}, False),
    ("paths", ["/api/v1"], {"path": "/api/v1?debug=1"}, True),  # without the query
    ("paths", ["/api/*"], {"path": "/api/v2/users"}, True),  # prefix
    ("paths", ["/api/*"], {"path": "/apix"}, False),
    ("paths", ["*.png"], {"path": "/img/logo.png"}, True),  # suffix
    ("paths", ["*.png"], {"path": "/img/logo.png.txt"}, False),
    ("paths", ["*"], {"path": "/anything"}, True),
    ("notPaths", ["/admin*"], {"path": "/admin/users"}, False),
    ("notPaths", ["/admin*"], {"path": "/home"}, True),
    ("ports", ["8080"], {"port": 8080}, True),
    ("ports", ["8080"], {"port": 9090}, False),
    ("notPorts", ["9090"], {"port": 9090}, False),
    ("hosts", ["svc.default.svc.cluster.local"], {"host": "SVC.default.svc.cluster.local"}, True),
    ("hosts", ["svc.default.svc.cluster.local"], {"host": "svc.default.svc.cluster.local:8080"}, False),
    ("hosts", ["*.example.com"], {"host": "api.example.com"}, True),
    ("hosts", ["api.*"], {"host": "api.example.com"}, True),
    ("notHosts", ["evil.com"], {"host": "evil.com"}, False),
])
def test_operations(field: str, values: list[str], request_: dict[str, Any], expected: bool) -> None:
    a = authz(policy("ALLOW", op(**{field: values})))
    assert http(a, **request_) is expected
    assert http(authz(policy("DENY", op(**{field: values}))), **request_) is not expected


@pytest.mark.parametrize("path", ["/admin", "/./admin", "/x/../admin", "/%61dmin/users", "/%2e%2e/admin",
                                  "/admin/./x"])
def test_paths_are_matched_as_the_proxy_normalised_them(path: str) -> None:
    """The proxy normalises once (http/pathnorm.py, tested there) and asks with the result; the
    query is never part of the match."""
    path = normalize(path.encode()).decode() + "?q=/x"
    assert not http(authz(policy("DENY", op(paths=["/admin*"]))), path=path)
    assert http(authz(policy("ALLOW", op(paths=["/admin*"]))), path=path)


def test_to_entries_are_ored_and_rule_parts_anded() -> None:
    rule = {"from": [{"source": {"namespaces": ["default"]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/read*"]}},
                   {"operation": {"methods": ["POST"], "paths": ["/write"]}}]}
    a = authz(policy("ALLOW", rule))
    assert http(a, principal=SLEEP, method="GET", path="/read/1")
    assert http(a, principal=SLEEP, method="POST", path="/write")
    assert not http(a, principal=SLEEP, method="POST", path="/read/1")  # AND inside an operation
    assert not http(a, principal=ADMIN, method="GET", path="/read/1")  # AND across from and to
    many = authz(policy("ALLOW", op(paths=["/a"]), op(paths=["/b"])))  # rules OR'ed
    assert http(many, path="/a") and http(many, path="/b") and not http(many, path="/c")


# --- conditions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("cond", "request_", "expected"), [
    ({"key": "request.headers[x-token]", "values": ["secret"]}, {"headers": {"x-token": "secret"}}, True),
    ({"key": "request.headers[X-Token]", "values": ["secret"]}, {"headers": {"x-token": "secret"}}, True),
    ({"key": "request.headers[x-token]", "values": ["secret"]}, {"headers": {"x-token": "other"}}, False),
    ({"key": "request.headers[x-token]", "values": ["secret"]}, {}, False),
    ({"key": "request.headers[x-token]", "values": ["*"]}, {"headers": {"x-token": "x"}}, True),  # presence
    ({"key": "request.headers[x-token]", "values": ["*"]}, {}, False),
    ({"key": "request.headers[x-token]", "values": ["Bearer *"]}, {"headers": {"x-token": "Bearer a"}}, True),
    ({"key": "request.headers[x-token]", "notValues": ["bad"]}, {"headers": {"x-token": "bad"}}, False),
    ({"key": "request.headers[x-token]", "notValues": ["bad"]}, {}, True),
    ({"key": "request.headers[v]", "values": ["v*"], "notValues": ["v2"]}, {"headers": {"v": "v2"}}, False),
    ({"key": "request.headers[v]", "values": ["v*"], "notValues": ["v2"]}, {"headers": {"v": "v1"}}, True),
    ({"key": "source.ip", "values": ["10.0.0.0/8"]}, {"ip": "10.3.3.3"}, True),
    ({"key": "source.ip", "notValues": ["10.0.0.0/8"]}, {"ip": "10.3.3.3"}, False),
    ({"key": "remote.ip", "values": ["10.0.0.0/8"]}, {"ip": "11.3.3.3"}, False),
    ({"key": "source.namespace", "values": ["default"]}, {"principal": SLEEP}, True),
    ({"key": "source.namespace", "values": ["default"]}, {"principal": ADMIN}, False),
    ({"key": "source.principal", "values": ["cluster.local/ns/ops/*"]}, {"principal": ADMIN}, True),
    ({"key": "source.principal", "values": ["*"]}, {}, False),
    ({"key": "source.serviceAccount", "values": ["ops/admin"]}, {"principal": ADMIN}, True),
    ({"key": "source.trustDomain", "values": ["example.org"]}, {"principal": OTHER_TD}, True),
    ({"key": "destination.port", "values": ["8080"]}, {"port": 8080}, True),
    ({"key": "destination.port", "values": ["8080"]}, {"port": 9000}, False),
])
def test_when_conditions(cond: dict[str, Any], request_: dict[str, Any], expected: bool) -> None:
    assert http(authz(policy("ALLOW", {"when": [cond]})), **request_) is expected


def test_every_condition_must_hold() -> None:
    a = authz(policy("ALLOW", {"when": [{"key": "request.headers[a]", "values": ["1"]},
                                        {"key": "destination.port", "values": ["80"]}]}))
    assert http(a, port=80, headers={"a": "1"})
    assert not http(a, port=81, headers={"a": "1"})
    assert not http(a, port=80, headers={"a": "2"})


# --- TCP ----------------------------------------------------------------------------------------

def test_http_only_fields_on_tcp_never_match_for_allow() -> None:
    a = authz(policy("ALLOW", {**src(namespaces=["default"]), **op(methods=["GET"])}))
    assert http(a, principal=SLEEP)
    assert not tcp(a, principal=SLEEP)  # the rule is dropped for TCP
    for http_only in (op(paths=["/x"]), op(hosts=["h"]), op(notMethods=["DELETE"]),
                      {"when": [{"key": "request.headers[x]", "notValues": ["y"]}]}):
        assert not tcp(authz(policy("ALLOW", http_only)))
    # a rule without HTTP-only fields keeps working for TCP next to one that has them
    mixed = authz(policy("ALLOW", op(methods=["GET"]), op(ports=["5432"])))
    assert tcp(mixed, port=5432) and not tcp(mixed, port=5433)


def test_http_only_fields_on_tcp_count_as_matching_for_deny() -> None:
    a = authz(policy("DENY", op(methods=["DELETE"])))
    assert http(a, method="GET") and not http(a, method="DELETE")
    assert not tcp(a)  # as if the method matched: the connection is denied
    scoped = authz(policy("DENY", op(methods=["DELETE"], ports=["8080"])))
    assert not tcp(scoped, port=8080)
    assert tcp(scoped, port=9090)  # the TCP part of the rule still decides
    by_peer = authz(policy("DENY", {**src(namespaces=["ops"]),
                                    "when": [{"key": "request.headers[x]", "values": ["1"]}]}))
    assert not tcp(by_peer, principal=ADMIN)
    assert tcp(by_peer, principal=SLEEP)
    neg = authz(policy("DENY", op(notPaths=["/health"])))
    assert http(neg, path="/health") and not tcp(neg)


def test_tcp_ports_and_addresses() -> None:
    a = authz(policy("ALLOW", {**src(ipBlocks=["127.0.0.0/8"]), **op(ports=["9000"])}))
    assert tcp(a, ip="127.0.0.1", port=9000)
    assert not tcp(a, ip="127.0.0.1", port=9001)
    assert not tcp(a, ip="10.0.0.1", port=9000)


# --- refused configs ----------------------------------------------------------------------------

@pytest.mark.parametrize(("entries", "message"), [
    ([{"name": "default/ext", "action": "CUSTOM", "rules": [{}], "provider": "opa"}],
     "authorization policy default/ext: action CUSTOM needs the external authorization provider 'opa'"),
    ([policy("REJECT", {})], "unknown action 'REJECT'"),
    ([policy("ALLOW", {"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]})],
     r"rules\[0\]\.when\[0\]\.key: condition key 'request.auth.claims\[iss\]' is not supported"),
    ([policy("ALLOW", {"when": [{"key": "request.auth.principal", "values": ["x"]}]})],
     "'request.auth.principal' is not supported"),
    ([policy("ALLOW", {"when": [{"key": "connection.sni", "values": ["x"]}]})], "'connection.sni'"),
    ([policy("ALLOW", {"when": [{"key": "source.ip"}]})], "at least one of `values` or `notValues`"),
    ([policy("ALLOW", src(requestPrincipals=["iss/sub"]))], "JWT"),
    ([policy("ALLOW", src(ipBlocks=["10.0.0.0/33"]))], "bad IP address or CIDR '10.0.0.0/33'"),
    ([policy("ALLOW", op(ports=["http"]))], "bad port 'http'"),
    ([policy("ALLOW", op(paths=["/a/{*}/b"]))], "path templates"),
    ([policy("ALLOW", op(paths=["/a*b*"]))], "wildcard"),
    ([policy("ALLOW", op(verbs=["GET"]))], r"rules\[0\]\.to\[0\]\.operation\.verbs: unknown field"),
    ([policy("ALLOW", {"from": [{"source": {"principals": "x"}}]})], "non-empty list"),
    ([policy("ALLOW", {"to": [{}]})], "must be a mapping with `operation`"),
    ([policy("ALLOW", {"unless": []})], "unknown field 'unless'"),
    ([{"action": "ALLOW"}], "must be a mapping with a name"),
    ({"name": "x"}, "must be a list"),
])
def test_configs_the_proxy_cannot_enforce_are_refused(entries: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        compile_policies(entries)


def test_custom_policy_makes_the_config_a_nack() -> None:
    config: dict[str, Any] = {"version": "v1", "listeners": {"outbound": [], "inbound": []}, "clusters": {},
                              "routes": {}, "endpoints": {},
                              "security": {"authorization": [{"name": "default/ext", "action": "CUSTOM",
                                                              "rules": [{}], "provider": "ext-authz"}]}}
    with pytest.raises(ConfigError, match="CUSTOM needs the external authorization provider 'ext-authz'"):
        compile_snapshot(config)
    config["security"]["authorization"] = [policy("DENY", {})]
    assert compile_snapshot(config).authz.active
    del config["security"]
    assert compile_snapshot(config).authz is ALLOW_ALL
