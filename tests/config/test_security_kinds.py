"""security.istio.io schemas: Istio's own files load cleanly, and each rule names the field and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from _pytest.mark import ParameterSet

from controlplane.config.validate import load_paths, load_text

SECURITY_KINDS = ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication")
PA, AP, RA = SECURITY_KINDS


def resource(kind: str, spec: str) -> str:
    """A resource whose spec body starts on line 7: a case's line is 6 + its line within `spec`."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    header = f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: x\n  namespace: ns\n"
    return f"{header}spec:\n{body}\n"


def test_header_puts_spec_body_on_line_7() -> None:
    # Guards the line arithmetic of every case below: the spec body starts on line 7.
    assert resource(PA, "mtls: {}").splitlines()[6] == "  mtls: {}"


def test_istio_security_testdata_loads_without_errors(istio_testdata: Path) -> None:
    files = [f for f in sorted(istio_testdata.rglob("*.yaml")) if "security.istio.io" in f.read_text()]
    result = load_paths(files)
    assert result.errors == []
    assert {r.kind for r in result.resources} == set(SECURITY_KINDS)
    assert len(result.resources) >= 6


def case(case_id: str, kind: str, spec: str, path: str, line: int, message: str) -> ParameterSet:
    return pytest.param(kind, spec, path, line, message, id=case_id)


# Each spec's first line is file line 7.
ERROR_CASES = [
    # PeerAuthentication
    case("pa-mode-enum", PA, """
        mtls:
          mode: BLAH
        """, "spec.mtls.mode", 8, "'BLAH' is not one of DISABLE, PERMISSIVE, STRICT, UNSET"),
    case("pa-unknown-field", PA, """
        mtls:
          mode: STRICT
          strict: true
        """, "spec.mtls.strict", 9, "unknown field 'strict'"),
    case("pa-port-range", PA, """
        selector:
          matchLabels:
            app: a
        portLevelMtls:
          70000:
            mode: STRICT
        """, "spec.portLevelMtls.70000", 12, "port '70000' must be between 1-65535"),
    case("pa-port-not-number", PA, """
        selector:
          matchLabels:
            app: a
        portLevelMtls:
          http:
            mode: STRICT
        """, "spec.portLevelMtls.http", 12, "port 'http' must be between 1-65535"),
    case("pa-port-level-needs-selector", PA, """
        mtls:
          mode: PERMISSIVE
        portLevelMtls:
          8080:
            mode: STRICT
        """, "spec.portLevelMtls", 10, "portLevelMtls requires selector"),
    case("pa-port-level-empty-selector", PA, """
        selector:
          matchLabels: {}
        portLevelMtls:
          8080:
            mode: STRICT
        """, "spec.portLevelMtls", 10, "portLevelMtls requires selector"),
    case("pa-port-level-empty", PA, """
        selector:
          matchLabels:
            app: a
        portLevelMtls: {}
        """, "spec.portLevelMtls", 10, "must have at least one element"),
    case("pa-selector-wildcard", PA, """
        selector:
          matchLabels:
            app: "web*"
        """, "spec.selector.matchLabels.app", 9, "invalid label value 'web*'"),
    # AuthorizationPolicy: action, provider, targets
    case("ap-action-enum", AP, """
        action: REJECT
        """, "spec.action", 7, "'REJECT' is not one of ALLOW, AUDIT, CUSTOM, DENY"),
    case("ap-deny-without-rules", AP, """
        action: DENY
        """, "spec.action", 7, "DENY action without `rules` is meaningless"),
    case("ap-custom-without-rules", AP, """
        action: CUSTOM
        provider:
          name: ext-authz
        """, "spec.action", 7, "CUSTOM action without `rules` is meaningless"),
    case("ap-custom-without-provider", AP, """
        action: CUSTOM
        rules:
        - {}
        """, "spec.provider", 7, "`provider.name` must not be empty"),
    case("ap-custom-empty-provider-name", AP, """
        action: CUSTOM
        provider:
          name: ""
        rules:
        - {}
        """, "spec.provider.name", 9, "`provider.name` must not be empty"),
    case("ap-provider-without-custom", AP, """
        provider:
          name: ext-authz
        rules:
        - {}
        """, "spec.provider", 8, "`provider` must not be set with non CUSTOM action, found ALLOW"),
    case("ap-custom-principals", AP, """
        action: CUSTOM
        provider:
          name: ext-authz
        rules:
        - from:
          - source:
              principals:
              - cluster.local/ns/a/sa/b
        """, "spec.rules[0].from[0].source.principals", 14,
         "`principals` is currently not supported with CUSTOM action"),
    case("ap-custom-jwt-condition", AP, """
        action: CUSTOM
        provider:
          name: ext-authz
        rules:
        - when:
          - key: request.auth.claims[iss]
            values: ["https://issuer"]
        """, "spec.rules[0].when[0].key", 12,
         "request.auth.claims[iss] is currently not supported with CUSTOM action"),
    case("ap-selector-and-targetrefs", AP, """
        selector:
          matchLabels:
            app: a
        targetRefs:
        - kind: Gateway
          group: gateway.networking.k8s.io
          name: waypoint
        """, "spec.targetRefs", 11, "only one of targetRefs or selector can be set"),
    case("ap-targetref-kind", AP, """
        targetRefs:
        - kind: Deployment
          group: apps
          name: web
        """, "spec.targetRefs[0].kind", 8, "targetRef must be to one of core/Service"),
    case("ap-targetref-namespace", AP, """
        targetRef:
          kind: Service
          name: web
          namespace: other
        """, "spec.targetRef.namespace", 10, "cross namespace referencing is not supported"),
    case("ap-targetref-name-required", AP, """
        targetRef:
          kind: Service
        """, "spec.targetRef.name", 8, "required field is missing"),
    # AuthorizationPolicy: from / source
    case("ap-from-empty-list", AP, """
        rules:
        - from: []
        """, "spec.rules[0].from", 8, "`from` must not be empty"),
    case("ap-from-without-source", AP, """
        rules:
        - from:
          - {}
        """, "spec.rules[0].from[0]", 9, "`from.source` must be set"),
    case("ap-source-empty", AP, """
        rules:
        - from:
          - source: {}
        """, "spec.rules[0].from[0].source", 9, "`from.source` must not be empty"),
    case("ap-source-unknown-field", AP, """
        rules:
        - from:
          - source:
              principal: ["cluster.local/ns/a/sa/b"]
        """, "spec.rules[0].from[0].source.principal", 10, "unknown field 'principal'"),
    case("ap-principal-empty", AP, """
        rules:
        - from:
          - source:
              principals:
              - ""
        """, "spec.rules[0].from[0].source.principals[0]", 11, "must not be empty"),
    case("ap-ip-blocks", AP, """
        rules:
        - from:
          - source:
              ipBlocks:
              - 10.0.0.0/8
              - 10.0.0.0/33
        """, "spec.rules[0].from[0].source.ipBlocks[1]", 12,
         "'10.0.0.0/33' is not an IP address or CIDR block"),
    case("ap-not-remote-ip-blocks", AP, """
        rules:
        - from:
          - source:
              notRemoteIpBlocks:
              - 300.1.2.3
        """, "spec.rules[0].from[0].source.notRemoteIpBlocks[0]", 11, "'300.1.2.3' is not an IP address"),
    case("ap-service-accounts-with-namespaces", AP, """
        rules:
        - from:
          - source:
              namespaces: ["a"]
              serviceAccounts: ["a/b"]
        """, "spec.rules[0].from[0].source.serviceAccounts", 11,
         "cannot set serviceAccounts with namespaces or principals"),
    case("ap-service-account-wildcard", AP, """
        rules:
        - from:
          - source:
              serviceAccounts:
              - "a/*"
        """, "spec.rules[0].from[0].source.serviceAccounts[0]", 11,
         "wildcard not allowed in service account"),
    case("ap-service-account-format", AP, """
        rules:
        - from:
          - source:
              notServiceAccounts:
              - a/b/c
        """, "spec.rules[0].from[0].source.notServiceAccounts[0]", 11,
         "expected format 'serviceAccount' or 'namespace/serviceAccount', found 'a/b/c'"),
    case("ap-trust-domain-slash", AP, """
        rules:
        - from:
          - source:
              trustDomains:
              - example.com/ns
        """, "spec.rules[0].from[0].source.trustDomains[0]", 11, "trust domain must not contain '/'"),
    case("ap-trust-domain-wildcard", AP, """
        rules:
        - from:
          - source:
              notTrustDomains:
              - "a*b"
        """, "spec.rules[0].from[0].source.notTrustDomains[0]", 11,
         "wildcard is only allowed at the start or end"),
    # AuthorizationPolicy: to / operation
    case("ap-to-empty-list", AP, """
        rules:
        - to: []
        """, "spec.rules[0].to", 8, "`to` must not be empty"),
    case("ap-to-without-operation", AP, """
        rules:
        - to:
          - operation:
        """, "spec.rules[0].to[0]", 9, "`to.operation` must be set"),
    case("ap-operation-empty", AP, """
        rules:
        - to:
          - operation: {}
        """, "spec.rules[0].to[0].operation", 9, "`to.operation` must not be empty"),
    case("ap-port-not-number", AP, """
        rules:
        - to:
          - operation:
              ports:
              - "8080"
              - http
        """, "spec.rules[0].to[0].operation.ports[1]", 12, "bad port (http)"),
    case("ap-port-range", AP, """
        rules:
        - to:
          - operation:
              notPorts: ["65536"]
        """, "spec.rules[0].to[0].operation.notPorts[0]", 10, "bad port (65536)"),
    case("ap-port-as-integer", AP, """
        rules:
        - to:
          - operation:
              ports:
              - 8080
        """, "spec.rules[0].to[0].operation.ports[0]", 11, "expected a string, got integer"),
    case("ap-path-template-order", AP, """
        rules:
        - to:
          - operation:
              paths:
              - /api/{**}/users/{*}
        """, "spec.rules[0].to[0].operation.paths[0]", 11, "{**} is not the last operator"),
    case("ap-path-template-brace", AP, """
        rules:
        - to:
          - operation:
              notPaths:
              - /files/{*}.txt
        """, "spec.rules[0].to[0].operation.notPaths[0]", 11, "beyond a supported path template"),
    case("ap-method-empty", AP, """
        rules:
        - to:
          - operation:
              methods:
              - GET
              - ""
        """, "spec.rules[0].to[0].operation.methods[1]", 12, "must not be empty"),
    # AuthorizationPolicy: when
    case("ap-when-key-required", AP, """
        rules:
        - when:
          - values: ["a"]
        """, "spec.rules[0].when[0].key", 9, "required field is missing"),
    case("ap-when-needs-values", AP, """
        rules:
        - when:
          - key: source.ip
        """, "spec.rules[0].when[0]", 9,
         "at least one of `values` or `notValues` must be set for key source.ip"),
    case("ap-when-unknown-key", AP, """
        rules:
        - when:
          - key: request.method
            values: ["GET"]
        """, "spec.rules[0].when[0].key", 9, "unknown attribute: request.method"),
    case("ap-when-header-needs-name", AP, """
        rules:
        - when:
          - key: request.headers
            values: ["a"]
        """, "spec.rules[0].when[0].key", 9, "bad key (request.headers): should have format a[b]"),
    case("ap-when-destination-labels", AP, """
        rules:
        - when:
          - key: destination.labels[app]
            values: ["a"]
        """, "spec.rules[0].when[0].key", 9, "is replaced by the workload selector"),
    case("ap-when-port-value", AP, """
        rules:
        - when:
          - key: destination.port
            values:
            - "80"
            - "99999"
        """, "spec.rules[0].when[0].values[1]", 12, "bad port (99999)"),
    case("ap-when-ip-value", AP, """
        rules:
        - when:
          - key: remote.ip
            notValues:
            - not-an-ip
        """, "spec.rules[0].when[0].notValues[0]", 11, "'not-an-ip' is not an IP address or CIDR block"),
    case("ap-when-service-account-value", AP, """
        rules:
        - when:
          - key: source.serviceAccount
            values:
            - "*"
        """, "spec.rules[0].when[0].values[0]", 11, "wildcard not allowed in service account"),
    # RequestAuthentication
    case("ra-issuer-required", RA, """
        jwtRules:
        - audiences: ["web"]
        """, "spec.jwtRules[0].issuer", 8, "issuer or jwksUri must be non-empty string"),
    case("ra-issuer-empty", RA, """
        jwtRules:
        - issuer: ""
        """, "spec.jwtRules[0].issuer", 8, "must not be empty"),
    case("ra-jwks-and-jwks-uri", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwksUri: https://issuer.example.com/jwks.json
          jwks: '{"keys": []}'
        """, "spec.jwtRules[0].jwks", 10, "only one of jwks or jwksUri can be set"),
    case("ra-jwks-uri-scheme", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwksUri: ftp://issuer.example.com/jwks.json
        """, "spec.jwtRules[0].jwksUri", 9, "url must have scheme http:// or https://"),
    case("ra-jwks-uri-not-url", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwksUri: issuer.example.com/jwks.json
        """, "spec.jwtRules[0].jwksUri", 9, "url must have scheme http:// or https://"),
    case("ra-jwks-not-json", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwks: '{"keys": ['
        """, "spec.jwtRules[0].jwks", 9, "jwks parse error"),
    case("ra-jwks-not-a-key-set", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwks: '{"keys": [{"n": "abc"}]}'
        """, "spec.jwtRules[0].jwks", 9, "jwks parse error: expected a JWK Set"),
    case("ra-from-header-name", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          fromHeaders:
          - prefix: "Bearer "
        """, "spec.jwtRules[0].fromHeaders[0].name", 10, "required field is missing"),
    case("ra-from-params-empty", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          fromParams:
          - ""
        """, "spec.jwtRules[0].fromParams[0]", 10, "must not be empty"),
    case("ra-claim-header-name", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          outputClaimToHeaders:
          - header: ":authority"
            claim: sub
        """, "spec.jwtRules[0].outputClaimToHeaders[0].header", 10,
         "header name ':authority' may contain only letters, digits"),
    case("ra-claim-required", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          outputClaimToHeaders:
          - header: x-sub
        """, "spec.jwtRules[0].outputClaimToHeaders[0].claim", 10, "required field is missing"),
    case("ra-timeout-type", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          timeout: 5
        """, "spec.jwtRules[0].timeout", 9, "expected a string, got integer"),
    case("ra-timeout-minimum", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          timeout: 500us
        """, "spec.jwtRules[0].timeout", 9, "below the minimum of 1ms"),
    case("ra-forward-token-type", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          forwardOriginalToken: "yes"
        """, "spec.jwtRules[0].forwardOriginalToken", 9, "expected a boolean"),
    case("ra-presence-enum", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          presence: MANDATORY
        """, "spec.jwtRules[0].presence", 9, "'MANDATORY' is not one of OPTIONAL, REQUIRED"),
    case("ra-unknown-field", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwksUrl: https://issuer.example.com/jwks.json
        """, "spec.jwtRules[0].jwksUrl", 9, "unknown field 'jwksUrl'"),
    case("ra-selector-and-targetref", RA, """
        selector:
          matchLabels:
            app: a
        targetRef:
          kind: Gateway
          group: gateway.networking.k8s.io
          name: ingress
        """, "spec.targetRef", 11, "only one of targetRefs or selector can be set"),
]


@pytest.mark.parametrize(("kind", "spec", "path", "line", "message"), ERROR_CASES)
def test_rule_reports_one_error_at_its_field(kind: str, spec: str, path: str, line: int,
                                             message: str) -> None:
    result = load_text(resource(kind, spec), "f.yaml")
    assert [(e.path, e.line) for e in result.errors] == [(path, line)], [str(e) for e in result.errors]
    error = result.errors[0]
    assert message in error.message
    assert (error.code, error.kind, error.namespace, error.resource) == ("IST0106", kind, "ns", "x")
    assert result.resources == []


WARNING_CASES = [
    case("ap-deny-http-only", AP, """
        action: DENY
        rules:
        - to:
          - operation:
              methods: ["POST"]
        """, "spec.rules[0]", 9, "will deny all traffic to TCP ports"),
    case("pa-selector-without-labels", PA, """
        selector: {}
        mtls:
          mode: STRICT
        """, "spec.selector", 7, "workload selector specified without labels"),
    case("ra-jwks-private-key", RA, """
        jwtRules:
        - issuer: https://issuer.example.com
          jwks: '{"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "secret"}]}'
        """, "spec.jwtRules[0].jwks", 9, "jwks key at index 0 contains private key material"),
]


@pytest.mark.parametrize(("kind", "spec", "path", "line", "message"), WARNING_CASES)
def test_istio_warnings_keep_the_resource(kind: str, spec: str, path: str, line: int, message: str) -> None:
    result = load_text(resource(kind, spec), "f.yaml")
    assert result.errors == []
    assert [(d.level, d.path, d.line) for d in result.diagnostics] == [("Warning", path, line)]
    assert message in result.diagnostics[0].message
    assert len(result.resources) == 1


VALID_SPECS = [
    pytest.param(PA, "{}", id="pa-empty-mesh-default"),
    pytest.param(PA, """
        selector:
          matchLabels:
            app: web
        mtls:
          mode: STRICT
        portLevelMtls:
          8080:
            mode: DISABLE
          "9090":
            mode: PERMISSIVE
        """, id="pa-port-keys-integer-and-string"),
    pytest.param(AP, "{}", id="ap-allow-nothing"),
    pytest.param(AP, "action: AUDIT", id="ap-audit-without-rules"),
    pytest.param(AP, """
        action: DENY
        rules:
        - {}
        """, id="ap-deny-everything"),
    pytest.param(AP, """
        targetRefs:
        - kind: Gateway
          group: gateway.networking.k8s.io
          name: waypoint
        - kind: Service
          group: ""
          name: web
        - kind: ServiceEntry
          group: networking.istio.io
          name: external
        action: CUSTOM
        provider:
          name: ext-authz
        rules:
        - from:
          - source:
              ipBlocks: ["10.0.0.0/8", "192.168.1.1"]
              notRemoteIpBlocks: ["2001:db8::/32"]
          to:
          - operation:
              hosts: ["*.example.com"]
              paths: ["/api/{*}/items/{**}", "/admin*"]
          when:
          - key: request.headers[x-tenant]
            values: ["a"]
        """, id="ap-custom-with-targetrefs"),
    pytest.param(AP, """
        selector:
          matchLabels:
            app: db
        action: DENY
        rules:
        - from:
          - source:
              notServiceAccounts: ["prod/api", "web"]
              trustDomains: ["*.example.com"]
          to:
          - operation:
              ports: ["5432"]
          when:
          - key: source.ip
            values: ["10.0.0.0/8"]
          - key: remote.ip
            notValues: ["203.0.113.4"]
          - key: destination.ip
            values: ["10.1.2.3"]
          - key: destination.port
            values: ["5432"]
          - key: source.namespace
            values: ["prod"]
          - key: source.principal
            values: ["cluster.local/ns/prod/sa/api"]
          - key: source.serviceAccount
            values: ["prod/api"]
          - key: source.trustDomain
            values: ["cluster.*"]
          - key: request.auth.principal
            values: ["issuer/sub"]
          - key: request.auth.audiences
            values: ["web"]
          - key: request.auth.presenter
            values: ["app"]
          - key: request.auth.claims[groups][admin]
            values: ["true"]
          - key: connection.sni
            values: ["db.example.com"]
          - key: experimental.envoy.filters.network.mysql_proxy[db.table]
            values: ["[update]"]
        """, id="ap-every-condition-key"),
    pytest.param(RA, """
        targetRef:
          kind: Gateway
          group: gateway.networking.k8s.io
          name: ingress
        jwtRules:
        - jwksUri: https://issuer.example.com:8443/jwks.json
        - issuer: https://a.example.com
          jwks_uri: http://a.example.com/jwks.json
        - issuer: https://b.example.com
          audiences: ["web", "mobile"]
          jwks: '{"keys": [{"kty": "RSA", "n": "abc", "e": "AQAB"}]}'
          fromHeaders:
          - name: x-jwt
            prefix: "Bearer "
          fromParams: ["token"]
          fromCookies: ["session"]
          outputPayloadToHeader: x-jwt-payload
          forwardOriginalToken: true
          outputClaimToHeaders:
          - header: x-sub
            claim: sub
          timeout: 5s
          spaceDelimitedClaims: ["roles"]
          presence: OPTIONAL
        """, id="ra-every-field"),
]


@pytest.mark.parametrize(("kind", "spec"), VALID_SPECS)
def test_valid_security_resources_load_without_diagnostics(kind: str, spec: str) -> None:
    result = load_text(resource(kind, spec), "f.yaml")
    assert result.diagnostics == [], [str(d) for d in result.diagnostics]
    assert [r.kind for r in result.resources] == [kind]


def test_diagnostic_prints_kind_resource_file_line_and_path() -> None:
    spec = """
        rules:
        - from:
          - source:
              principals: [""]
        """
    (error,) = load_text(resource(AP, spec), "f.yaml").errors
    assert str(error) == ("Error [IST0106] (AuthorizationPolicy ns/x f.yaml:10) "
                          "spec.rules[0].from[0].source.principals[0]: must not be empty")
