"""meshctl analyze: each analyzer on a small config that trips it and one that does not,
the CLI's outputs and exit codes, and Istio's bookinfo samples."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from controlplane.config.analyze import analyze, covers
from controlplane.config.analyze_cli import EXIT_ERRORS, EXIT_WARNINGS
from controlplane.config.diagnostics import Diagnostic
from controlplane.config.validate import load_paths, load_text
from meshctl.cli import cli
from tests.conftest import MESHCTL

# reviews (v1, v2) and ratings (v1) in default; details (v1) in other
WORKLOADS = """
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v1}
spec:
  selector: {matchLabels: {app: reviews, version: v1}}
  template: {metadata: {labels: {app: reviews, version: v1}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v2}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  template: {metadata: {labels: {app: reviews, version: v2}}}
---
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}, {name: grpc, port: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-v1-abc, labels: {app: ratings, version: v1}}
spec: {}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: other}
spec:
  selector: {app: details}
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: details-v1, namespace: other}
spec:
  selector: {matchLabels: {app: details}}
  template: {metadata: {labels: {app: details, version: v1}}}
"""

REVIEWS_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def run(*docs: str, workloads: bool = True) -> list[Diagnostic]:
    """Analyze inline YAML documents (plus the shared workloads); the fixtures must be valid."""
    text = "\n---\n".join(((WORKLOADS,) if workloads else ()) + docs)
    loaded = load_text(text, "test.yaml")
    assert not loaded.errors, "\n".join(map(str, loaded.errors))
    return analyze(loaded.resources, loaded.diagnostics)


def found(diagnostics: list[Diagnostic], code: str) -> list[str]:
    return [d.message for d in diagnostics if d.code == code]


def vs(name: str, body: str, namespace: str = "default") -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}")


def route_to(host: str, extra: str = "") -> str:
    return f"  hosts: [{host}]\n  http:\n  - route:\n    - destination: {{host: {host}{extra}}}\n"


# --- IST0101 ReferencedResourceNotFound -----------------------------------------------------------

def test_destination_host_not_found() -> None:
    out = run(vs("nope", route_to("nope")), workloads=False)
    assert found(out, "IST0101") == ['Referenced host not found: "nope"']
    d = next(d for d in out if d.code == "IST0101")
    assert (d.level, d.name, d.kind, d.namespace, d.resource) == \
        ("Error", "ReferencedResourceNotFound", "VirtualService", "default", "nope")
    assert d.path == "spec.http[0].route[0].destination.host" and d.line == 8


@pytest.mark.parametrize("host", ["reviews", "reviews.default.svc.cluster.local",
                                  "details.other.svc.cluster.local"])
def test_destination_host_from_kubernetes_services(host: str) -> None:
    assert run(vs("r", route_to(host))) == []


def test_short_name_resolves_in_the_virtual_services_namespace() -> None:
    assert found(run(vs("r", route_to("reviews"), namespace="other")), "IST0101") == \
        ['Referenced host not found: "reviews"']
    assert run(vs("d", route_to("details"), namespace="other")) == []


def test_destination_host_from_service_entries_including_wildcards() -> None:
    entry = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
"""
    assert run(entry, vs("a", route_to("api.example.com")), vs("w", route_to("en.wikipedia.org"))) == []
    assert found(run(entry, vs("x", route_to("api.example.org"))), "IST0101") == \
        ['Referenced host not found: "api.example.org"']


def test_destination_port_must_exist_and_disambiguate() -> None:
    out = run(vs("r", route_to("reviews", ", port: {number: 8000}")), vs("ra", route_to("ratings")))
    assert found(out, "IST0101") == ['Referenced host:port not found: "reviews:8000"']
    assert found(out, "IST0112") == ['This VirtualService routes to a service "ratings" that exposes '
                                     'multiple ports [9080 9090]. Specifying a port in the destination is '
                                     'required to disambiguate.']
    assert run(vs("ra", route_to("ratings", ", port: {number: 9090}"))) == []


def test_subset_needs_a_destination_rule() -> None:
    route = route_to("reviews", ", subset: v1")
    assert found(run(vs("r", route)), "IST0101") == \
        ['Referenced host+subset in destinationrule not found: "reviews+v1"']
    assert run(vs("r", route), REVIEWS_DR) == []
    assert found(run(vs("r", route_to("reviews", ", subset: v3")), REVIEWS_DR), "IST0101") == \
        ['Referenced host+subset in destinationrule not found: "reviews+v3"']


def test_subset_from_a_destination_rule_in_another_namespace() -> None:
    dr = REVIEWS_DR.replace("{name: reviews}", "{name: reviews, namespace: other}").replace(
        "host: reviews", "host: reviews.default.svc.cluster.local")
    assert run(vs("r", route_to("reviews", ", subset: v1")), dr) == []
    hidden = dr.replace("  subsets:", "  exportTo: [.]\n  subsets:")
    assert found(run(vs("r", route_to("reviews", ", subset: v1")), hidden), "IST0101") != []


def test_mirror_host_and_subset() -> None:
    body = route_to("reviews") + "    mirror: {host: shadow, subset: v1}\n"
    assert found(run(vs("r", body)), "IST0101") == [
        'Referenced mirror host not found: "shadow"',
        'Referenced mirror+subset in destinationrule not found: "shadow+v1"']


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*/reviews.example.com"]
---
apiVersion: v1
kind: Pod
metadata: {name: ingressgateway-1, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {}
"""


def test_virtual_service_gateway_must_exist() -> None:
    body = "  hosts: [reviews.example.com]\n  gateways: [{gw}]\n  http:\n  - route:\n" \
           "    - destination: {{host: reviews}}\n"
    for ok in ("istio-system/ingress", "mesh"):
        assert run(GATEWAY, vs("r", body.format(gw=ok))) == [], ok
    out = run(GATEWAY, vs("r", body.format(gw="ingress")))  # the short name is in the VS's namespace
    assert found(out, "IST0101") == ['Referenced gateway not found: "ingress"']
    assert [d.path for d in out] == ["spec.gateways[0]"]


def test_virtual_service_host_not_offered_by_its_gateway() -> None:
    body = "  hosts: [ratings.example.com]\n  gateways: [istio-system/ingress]\n  http:\n  - route:\n" \
           "    - destination: {host: ratings, port: {number: 9080}}\n"
    assert found(run(GATEWAY, vs("r", body)), "IST0132") == [
        "one or more host [ratings.example.com] defined in VirtualService default/r not found in "
        "Gateway istio-system/ingress."]


def test_gateway_named_in_a_match_must_exist() -> None:
    body = "  hosts: [reviews]\n  http:\n  - match: [{gateways: [missing]}]\n    route:\n" \
           "    - destination: {host: reviews}\n  - route:\n    - destination: {host: reviews}\n"
    assert found(run(vs("r", body)), "IST0101") == ['Referenced gateway not found: "missing"']


def sidecar(name: str, spec: str, namespace: str = "default") -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")


EGRESS = "  egress: [{hosts: ['./*']}]\n"


def test_sidecar_egress_host_must_exist() -> None:
    hosts = ("./reviews.default.svc.cluster.local", "other/details.other.svc.cluster.local",
             "*/ratings.default.svc.cluster.local", "istio-system/*", "~/*", "./*.example.com")
    assert run(sidecar("s", f"  egress:\n  - hosts: {json.dumps(list(hosts))}\n")) == []
    missing = ["./nope.default.svc.cluster.local", "other/reviews.default.svc.cluster.local"]
    out = run(sidecar("s", f"  egress:\n  - hosts: {json.dumps(missing)}\n"))
    assert found(out, "IST0101") == [f'Referenced egress host not found: "{host}"' for host in missing]


def test_authorization_policy_source_namespace_must_exist() -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow}
spec:
  rules:
  - from: [{source: {namespaces: [other, "oth*", typo]}}]
"""
    assert found(run(policy), "IST0101") == ['Referenced namespace not found: "typo"']


# --- IST0109 ConflictingMeshGatewayVirtualServiceHosts --------------------------------------------

def test_two_virtual_services_for_one_host_on_the_mesh_gateway() -> None:
    out = run(vs("a", route_to("reviews")), vs("b", route_to("reviews.default.svc.cluster.local")))
    conflicts = [d for d in out if d.code == "IST0109"]
    assert [d.resource for d in conflicts] == ["a", "b"]
    assert conflicts[0].message.startswith("The VirtualServices default/a,default/b associated with mesh "
                                           "gateway define the same host reviews.default.svc.cluster.local")
    assert conflicts[0].level == "Error"


def test_virtual_services_for_one_host_on_different_gateways_or_namespaces_do_not_conflict() -> None:
    on_gateway = route_to("reviews").replace("  http:", "  gateways: [istio-system/ingress]\n  http:")
    assert found(run(GATEWAY, vs("a", route_to("reviews")), vs("b", on_gateway)), "IST0109") == []
    local = route_to("reviews").replace("  http:", "  exportTo: [.]\n  http:")
    assert found(run(vs("a", local), vs("b", local, namespace="other")), "IST0109") == []


# --- IST0130 / IST0131: unreachable rules and ineffective matches ---------------------------------

def http_rules(*rules: str) -> str:
    body = "  hosts: [reviews]\n  http:\n"
    for rule in rules:
        body += f"  - {rule}\n    route:\n    - destination: {{host: reviews}}\n" if rule else \
            "  - route:\n    - destination: {host: reviews}\n"
    return body


def test_rule_after_a_catch_all_is_unreachable() -> None:
    out = run(vs("r", http_rules("", "match: [{uri: {prefix: /api}}]", "")))
    assert found(out, "IST0130") == [
        "VirtualService rule #1 not used (route without matches defined before).",
        "VirtualService rule #2 not used (only the last rule can have no matches)."]
    assert [d.level for d in out] == ["Warning", "Warning"]


def test_rule_after_a_match_that_takes_every_request_is_unreachable() -> None:
    out = run(vs("r", http_rules('name: all\n    match: [{uri: {prefix: /}}]', "")))
    assert found(out, "IST0130") == ['VirtualService rule #1 not used (catch-all match in rule "all" '
                                     'defined before).']


def test_duplicate_match_is_ineffective_and_its_rule_unreachable() -> None:
    out = run(vs("r", http_rules("match: [{headers: {end-user: {exact: jason}}}]",
                                 "match: [{name: again, headers: {end-user: {exact: jason}}}]", "")))
    assert found(out, "IST0131") == ['VirtualService rule #1 match "again" is not used '
                                     '(duplicate/overlapping match in rule #0).']
    assert found(out, "IST0130") == ["VirtualService rule #1 not used (all matches used by prior rules)."]
    assert next(d for d in out if d.code == "IST0131").level == "Info"


def test_match_covered_by_an_earlier_prefix_is_ineffective() -> None:
    out = run(vs("r", http_rules("match: [{uri: {prefix: /api}}]",
                                 "match: [{uri: {prefix: /api/v1}}, {uri: {exact: /login}}]")))
    assert found(out, "IST0131") == ["VirtualService rule #1 match #0 is not used "
                                     "(duplicate/overlapping match in rule #0)."]
    assert found(out, "IST0130") == []  # /login still reaches rule #1


def test_specific_matches_before_general_ones_are_all_reachable() -> None:
    assert run(vs("r", http_rules("match: [{uri: {prefix: /api/v1}}]",
                                  "match: [{uri: {prefix: /api}, headers: {x-v: {exact: '2'}}}]",
                                  "match: [{uri: {prefix: /api}}]",
                                  "match: [{uri: {exact: /ap}, method: {exact: POST}}]", ""))) == []


def test_covers() -> None:
    assert covers({}, {"uri": {"exact": "/x"}})
    assert covers({"uri": {"prefix": "/a"}}, {"uri": {"exact": "/ab"}, "port": 80})
    assert not covers({"uri": {"prefix": "/a"}, "port": 80}, {"uri": {"exact": "/ab"}})
    assert covers({"headers": {"x": {}}}, {"headers": {"x": {"exact": "1"}}})
    assert not covers({"headers": {"x": {"exact": "1"}}}, {"headers": {"x": {"regex": "1"}}})
    assert covers({"sourceLabels": {"app": "a"}}, {"sourceLabels": {"app": "a", "v": "1"}})
    assert covers({"sniHosts": ["a", "b"]}, {"sniHosts": ["a"]})
    assert not covers({"sniHosts": ["a"]}, {"sniHosts": ["a", "b"]})
    assert not covers({"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/a"}, "ignoreUriCase": True})


def test_tcp_rules() -> None:
    rule = "  - match: [{port: 9080}]\n    route: [{destination: {host: reviews}}]\n"
    body = "  hosts: [reviews]\n  tcp:\n" + rule * 2
    assert found(run(vs("r", body)), "IST0130") == ["VirtualService rule #1 not used (all matches used by "
                                                    "prior rules)."]


# --- IST0134 ServiceEntryAddressesRequired --------------------------------------------------------

def service_entry(ports: str, extra: str = "") -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\n"
            f"spec:\n  hosts: [db.example.com]\n  ports: {ports}\n  resolution: DNS\n{extra}")


def test_service_entry_with_tcp_ports_needs_addresses() -> None:
    out = run(service_entry("[{number: 5432, name: tcp, protocol: TCP}, {number: 6432, name: pool}]"))
    assert found(out, "IST0134") == ["ServiceEntry addresses are required for this protocol."] * 2
    assert [d.path for d in out] == ["spec.ports[0]", "spec.ports[1]"]


@pytest.mark.parametrize("spec", [
    service_entry("[{number: 5432, name: tcp, protocol: TCP}]", "  addresses: [10.1.2.3]\n"),
    service_entry("[{number: 80, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}]"),
])
def test_service_entry_without_tcp_or_with_addresses(spec: str) -> None:
    assert run(spec) == []


# --- IST0127 NoMatchingWorkloadsFound -------------------------------------------------------------

def policy(kind: str, selector: str, namespace: str = "default") -> str:
    spec = {"PeerAuthentication": "  mtls: {mode: STRICT}\n",
            "AuthorizationPolicy": "  action: ALLOW\n  rules: [{}]\n",
            "RequestAuthentication": "  jwtRules: [{issuer: https://issuer.example.com}]\n"}[kind]
    selector = f"  selector: {{matchLabels: {selector}}}\n" if selector else ""
    return (f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: p, namespace: {namespace}}}\n"
            f"spec:\n{selector}{spec}")


@pytest.mark.parametrize("kind", ["AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"])
def test_policy_selector_matching_no_workload(kind: str) -> None:
    out = run(policy(kind, "{app: reviews, version: v9}"))
    assert found(out, "IST0127") == ["No matching workloads for this resource with the following labels: "
                                     "app=reviews,version=v9"]
    assert out[0].level == "Warning" and out[0].path == "spec.selector"
    assert run(policy(kind, "{app: reviews, version: v2}")) == []


def test_policy_selectors_look_in_their_namespace_or_the_whole_mesh_from_the_root() -> None:
    assert found(run(policy("AuthorizationPolicy", "{app: details}")), "IST0127") != []
    assert run(policy("AuthorizationPolicy", "{app: details}", namespace="istio-system")) == []
    assert run(policy("AuthorizationPolicy", "", namespace="other")) == []
    assert found(run(policy("AuthorizationPolicy", "", namespace="empty")), "IST0127") == \
        ["No matching workloads for this resource with the following labels: "]


def test_policy_attached_by_target_ref_is_not_a_selector() -> None:
    ap = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
          "metadata: {name: p, namespace: empty}\n"
          "spec:\n  targetRefs: [{kind: Service, group: '', name: reviews}]\n  rules: [{}]\n")
    assert run(ap) == []


# --- IST0173 DestinationRuleSubsetNotSelectPods, IST0174 UnknownDestinationRuleHost ---------------

def test_subset_selecting_no_workload_of_its_service() -> None:
    dr = REVIEWS_DR + "  - {name: v9, labels: {version: v9}}\n  - {name: r1, labels: {app: ratings}}\n"
    out = run(dr)
    assert found(out, "IST0173") == [
        "The Subset v9 defined in the DestinationRule does not select any pods. Which may lead to 503 UH "
        "(NoHealthyUpstream).",
        "The Subset r1 defined in the DestinationRule does not select any pods. Which may lead to 503 UH "
        "(NoHealthyUpstream)."]  # ratings' pods carry app=ratings, but they are not reviews' endpoints
    assert [d.path for d in out] == ["spec.subsets[2]", "spec.subsets[3]"] and out[0].level == "Error"


def test_subsets_may_select_on_topology_labels_files_cannot_show() -> None:
    dr = REVIEWS_DR + "  - {name: west, labels: {version: v1, topology.kubernetes.io/region: us-west}}\n"
    assert run(dr) == []


def test_subsets_of_a_service_entry_select_its_endpoints() -> None:
    se = service_entry("[{number: 80, name: http, protocol: HTTP}]",
                       "  endpoints: [{address: 10.0.0.1, labels: {version: v1}}]\n").replace("DNS", "STATIC")
    dr = REVIEWS_DR.replace("host: reviews", "host: db.example.com")
    assert found(run(se, dr), "IST0173") == ["The Subset v2 defined in the DestinationRule does not select "
                                             "any pods. Which may lead to 503 UH (NoHealthyUpstream)."]


def test_destination_rule_host_not_in_the_mesh() -> None:
    out = run(REVIEWS_DR.replace("host: reviews", "host: reviewz"))
    assert found(out, "IST0174") == ["The host reviewz defined in the DestinationRule does not match any "
                                     "services in the mesh."]
    assert found(out, "IST0173") == []


# --- Sidecars: IST0101 selector, IST0110, IST0111, IST0167 ----------------------------------------

def test_sidecar_selector_matching_no_workload() -> None:
    out = run(sidecar("s", EGRESS + "  workloadSelector: {labels: {app: reviewz}}\n"))
    assert found(out, "IST0101") == ['Referenced selector not found: "app=reviewz"']
    assert run(sidecar("s", EGRESS + "  workloadSelector: {labels: {app: reviews}}\n")) == []


def test_sidecars_selecting_the_same_workload() -> None:
    out = run(sidecar("a", EGRESS + "  workloadSelector: {labels: {app: reviews}}\n"),
              sidecar("b", EGRESS + "  workloadSelector: {labels: {version: v2}}\n"))
    assert found(out, "IST0110") == ['The Sidecars [a b] in namespace "default" select the same workload pod '
                                     '"reviews-v2", which can lead to undefined behavior.'] * 2
    assert run(sidecar("a", EGRESS + "  workloadSelector: {labels: {version: v1}}\n"),
               sidecar("b", EGRESS + "  workloadSelector: {labels: {version: v2}}\n")) == []


def test_several_selectorless_sidecars_in_a_namespace() -> None:
    out = run(sidecar("a", EGRESS), sidecar("b", EGRESS))
    assert found(out, "IST0111") == ['The Sidecars [a b] in namespace "default" have no workload selector, '
                                     'which can lead to undefined behavior.'] * 2
    assert run(sidecar("a", EGRESS),
               sidecar("b", EGRESS, namespace="other")) == []


def test_sidecar_for_ambient_workloads_is_ineffective() -> None:
    namespace = ("apiVersion: v1\nkind: Namespace\n"
                 "metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}")
    out = run(namespace, sidecar("s", EGRESS, namespace="other"))
    assert found(out, "IST0167") == ["The policy has no impact: namespace is in ambient mode, the policy has "
                                     "no impact."]


def test_gateway_selector_matching_no_workload() -> None:
    assert run(GATEWAY) == []
    out = run(GATEWAY.replace("istio: ingressgateway}\n  servers", "istio: ingress}\n  servers"))
    assert found(out, "IST0101") == ['Referenced selector not found: "istio=ingress"']


# --- IST0167 IneffectivePolicy: port-level mTLS -------------------------------------------------

def test_port_level_mtls_on_a_port_no_service_targets() -> None:
    pa = policy("PeerAuthentication", "{app: details}", namespace="other") + \
        "  portLevelMtls:\n    8080: {mode: DISABLE}\n    9080: {mode: DISABLE}\n"
    out = run(pa)
    assert found(out, "IST0167") == ["The policy has no impact: portLevelMtls port 9080 is not a target port "
                                     "of any Service of the selected workloads [8080]."]
    assert out[0].path == "spec.portLevelMtls.9080" and out[0].line > 0


# --- loading diagnostics, duplicates, order -------------------------------------------------------

def test_schema_errors_from_loading_are_part_of_the_report() -> None:
    loaded = load_text(policy("PeerAuthentication", "").replace("STRICT", "BOGUS"), "bad.yaml")
    out = analyze(loaded.resources, loaded.diagnostics)
    assert [(d.code, d.name, d.level) for d in out] == [("IST0106", "SchemaValidationError", "Error")]


def test_a_resource_defined_twice_is_reported_and_analyzed_once() -> None:
    out = run(vs("r", route_to("reviews")), vs("r", route_to("ratings", ", port: {number: 9080}")))
    assert [(d.code, d.level) for d in out] == [("ZM0002", "Error")]
    assert out[0].message.startswith("VirtualService default/r is also defined in test.yaml:")


def test_order_is_by_file_line_and_code_whatever_the_input_order(tmp_path: Path) -> None:
    egress = sidecar("s", "  egress: [{hosts: ['./q.r']}]\n")
    (tmp_path / "a.yaml").write_text(vs("x", route_to("nope")) + "\n---\n" + egress)
    (tmp_path / "b.yaml").write_text(WORKLOADS + "\n---\n" + vs("y", route_to("gone")))
    loaded = load_paths([tmp_path])
    out = analyze(loaded.resources, loaded.diagnostics)
    assert out == analyze(list(reversed(loaded.resources)), loaded.diagnostics)
    assert [(Path(d.file).name, d.code) for d in out] == [("a.yaml", "IST0101"), ("a.yaml", "IST0101"),
                                                          ("b.yaml", "IST0101")]
    assert [(d.file, d.line) for d in out] == sorted((d.file, d.line) for d in out)


# --- meshctl analyze ------------------------------------------------------------------------------

@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    files = {"clean": WORKLOADS + "\n---\n" + vs("r", route_to("reviews")),
             "warning": service_entry("[{number: 5432, name: tcp, protocol: TCP}]"),
             "error": vs("r", route_to("nope")),
             "info": WORKLOADS + "\n---\n" + vs("r", http_rules("match: [{uri: {prefix: /a}}, {port: 80}, "
                                                                "{uri: {prefix: /a}}]", ""))}
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return {name: tmp_path / f"{name}.yaml" for name in files}


@pytest.mark.parametrize(("config", "code"), [("clean", 0), ("info", 0), ("warning", EXIT_WARNINGS),
                                              ("error", EXIT_ERRORS)])
def test_exit_codes(configs: dict[str, Path], config: str, code: int) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(configs[config])])
    assert result.exit_code == code, result.output
    assert (EXIT_WARNINGS, EXIT_ERRORS) == (79, 80)


def test_usage_errors_exit_2(configs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["analyze"]).exit_code == 2
    assert runner.invoke(cli, ["analyze", "-f", str(tmp_path / "missing.yaml")]).exit_code == 2
    assert runner.invoke(cli, ["analyze", "-f", str(configs["clean"]), "-o", "xml"]).exit_code == 2
    (tmp_path / "empty").mkdir()
    assert runner.invoke(cli, ["analyze", "-f", str(tmp_path / "empty")]).exit_code == 2


def test_clean_config_prints_istioctls_all_clear(configs: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(configs["clean"])])
    assert result.stdout == ""
    assert result.stderr == f"\u2714 No validation issues found when analyzing {configs['clean']}.\n"
    result = CliRunner().invoke(cli, ["analyze", "-f", str(configs["clean"]), "-f", str(configs["clean"])])
    assert result.stderr.startswith("\u2714 No validation issues found when analyzing:\n  - ")


def test_log_output_one_line_per_message_then_a_summary(configs: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(configs["error"]), "-f", str(configs["warning"])])
    lines = result.stdout.splitlines()
    assert lines[0] == (f"Error [IST0101] (VirtualService default/r {configs['error']}:8) "
                        'spec.http[0].route[0].destination.host: Referenced host not found: "nope"')
    assert lines[1].startswith("Warning [IST0134] (ServiceEntry default/db ")
    assert len(lines) == 2
    assert result.stderr == "Analyzed 2 files: 1 error, 1 warning, 0 info messages.\n"


def test_json_and_yaml_outputs_are_lists_of_messages(configs: dict[str, Path]) -> None:
    args = ["analyze", "-f", str(configs["error"]), "-f", str(configs["warning"]), "-o"]
    as_json = json.loads(CliRunner().invoke(cli, [*args, "json"]).stdout)
    assert [(m["level"], m["code"], m["name"], m["kind"], m["resource"]) for m in as_json] == [
        ("Error", "IST0101", "ReferencedResourceNotFound", "VirtualService", "r"),
        ("Warning", "IST0134", "ServiceEntryAddressesRequired", "ServiceEntry", "db")]
    assert as_json[0]["message"] == 'Referenced host not found: "nope"' and as_json[0]["line"] == 8
    assert yaml.safe_load(CliRunner().invoke(cli, [*args, "yaml"]).stdout) == as_json
    clean = CliRunner().invoke(cli, ["analyze", "-f", str(configs["clean"]), "-o", "json"])
    assert json.loads(clean.stdout) == [] and clean.exit_code == 0


def test_table_output_aligns_columns(configs: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(configs["error"]), "-f", str(configs["warning"]),
                                      "-o", "table"])
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["LEVEL", "CODE", "NAME", "RESOURCE", "LOCATION", "MESSAGE"]
    assert len(rows) == 2 and len({row.index("IST01") for row in rows}) == 1
    assert {row.index(str(configs["error"].parent)) for row in rows} == {header.index("LOCATION")}




@pytest.mark.parametrize(("config", "code"), [("clean", 0), ("warning", 79), ("error", 80)])
def test_meshctl_analyze_process_exit_codes(configs: dict[str, Path], config: str, code: int) -> None:
    proc = subprocess.run([*MESHCTL, "analyze", "-f", str(configs[config])], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    if config == "clean":
        assert proc.stderr.startswith("\u2714 No validation issues found")
    else:
        assert proc.stdout.startswith(("Warning [IST0134]", "Error [IST0101]"))


# --- Istio's bookinfo -----------------------------------------------------------------------------

# bookinfo.yaml deploys ratings and details only at v1; destination-rule-all.yaml declares more.
UNDEPLOYED_SUBSETS = [("ratings", "v2"), ("ratings", "v2-mysql"), ("ratings", "v2-mysql-vm"),
                      ("details", "v2")]


def analyze_files(*paths: Path) -> list[Diagnostic]:
    loaded = load_paths(list(paths))
    return analyze(loaded.resources, loaded.diagnostics)


def virtual_service_files(root: Path) -> list[Path]:
    return sorted((root / "bookinfo").glob("virtual-service-*.yaml"))


def test_bookinfo_with_its_destination_rules_has_no_missing_references(istio_testdata: Path) -> None:
    bookinfo = istio_testdata / "bookinfo"
    assert len(virtual_service_files(istio_testdata)) >= 10
    for f in virtual_service_files(istio_testdata):
        out = analyze_files(bookinfo / "bookinfo.yaml", bookinfo / "destination-rule-all.yaml", f)
        assert [(d.code, d.resource, d.message.split()[2]) for d in out] == \
            [("IST0173", *subset) for subset in UNDEPLOYED_SUBSETS], f"{f.name}:\n" + "\n".join(map(str, out))


def test_bookinfo_subsets_without_destination_rules_are_missing(istio_testdata: Path) -> None:
    bookinfo = istio_testdata / "bookinfo"
    out = analyze_files(bookinfo / "bookinfo.yaml", bookinfo / "virtual-service-all-v1.yaml")
    assert found(out, "IST0101") == [f'Referenced host+subset in destinationrule not found: "{s}+v1"'
                                     for s in ("productpage", "reviews", "ratings", "details")]
    assert {d.code for d in out} == {"IST0101"}
    out = analyze_files(bookinfo / "bookinfo.yaml", bookinfo / "destination-rule-reviews.yaml",
                        bookinfo / "virtual-service-reviews-v2-v3.yaml")
    assert out == []


def test_bookinfo_fault_injection_sample_has_an_unreachable_rule(istio_testdata: Path) -> None:
    bookinfo = istio_testdata / "bookinfo"
    out = analyze_files(bookinfo / "bookinfo.yaml", bookinfo / "fault-injection-details-v1.yaml")
    assert [(d.code, d.path) for d in out] == [("IST0130", "spec.http[1]")]


def test_bookinfo_directory(istio_testdata: Path) -> None:
    out = analyze_files(istio_testdata / "bookinfo")
    by_code = {d.code for d in out}
    assert by_code == {"IST0101", "IST0130", "IST0173", "ZM0001", "ZM0002"}
    assert found(out, "IST0101") == ['Referenced selector not found: "istio=ingressgateway"'] * 2 + \
        ['Referenced host not found: "cert-manager-resolver"']
    assert {d.kind for d in out if d.code == "ZM0001"} == {"EnvoyFilter"}
    # the samples are alternatives: each VirtualService file redefines the same few resources
    assert {d.resource for d in out if d.code == "ZM0002"} == {"productpage", "reviews", "ratings", "details"}
    result = CliRunner().invoke(cli, ["analyze", "-f", str(istio_testdata / "bookinfo")])
    assert result.exit_code == EXIT_ERRORS
    assert result.stdout.count("\n") == len(out)
