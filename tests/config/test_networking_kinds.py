"""networking.istio.io schemas: Istio's own samples load cleanly, and each rule names the bad field.

Bad examples are small specs; the line an error must point at is marked `# <-` in the spec.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from controlplane.config.diagnostics import Diagnostic
from controlplane.config.kinds.networking import SCHEMAS
from controlplane.config.validate import load_paths, load_text

HEADER = ("apiVersion: networking.istio.io/v1\nkind: {kind}\n"
          "metadata:\n  name: {name}\n  namespace: ns\nspec:\n")
MARK = "# <-"


def document(kind: str, spec: str, name: str = "x") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return HEADER.format(kind=kind, name=name) + body


def errors(kind: str, spec: str) -> list[Diagnostic]:
    return load_text(document(kind, spec), "t.yaml").errors


def marked_line(kind: str, spec: str) -> int:
    lines = document(kind, spec).splitlines()
    marked = [n for n, line in enumerate(lines, 1) if MARK in line]
    assert len(marked) == 1, "mark exactly one line with # <-"
    return marked[0]


def test_istio_samples_load_without_errors(istio_testdata: Path) -> None:
    result = load_paths([istio_testdata])
    problems = [str(d) for d in result.diagnostics if d.kind in SCHEMAS]
    assert problems == []
    loaded = {r.kind for r in result.resources}
    assert set(SCHEMAS) <= loaded
    assert sum(r.kind in SCHEMAS for r in result.resources) >= 40


VALID = {
    "VirtualService": """
        hosts: [reviews.prod.svc.cluster.local, "*.example.com"]
        gateways: [istio-system/ingress, mesh]
        exportTo: [".", other]
        http:
        - name: canary
          match:
          - uri: {prefix: ""}
            headers:
              end-user: {exact: jason}
              x-present: {}
            withoutHeaders:
              x-debug: {regex: "*"}
            queryParams:
              v: {regex: "^[0-9]+$"}
            method: {exact: GET}
            port: 9080
            sourceLabels: {app: productpage}
            sourceNamespace: bookinfo
            gateways: [mesh]
            ignoreUriCase: true
          route:
          - destination: {host: reviews, subset: v2, port: {number: 9080}}
            weight: 25
            headers:
              request: {set: {x-canary: "true"}, remove: [x-debug]}
              response: {add: {x-served-by: reviews}}
          - destination: {host: reviews, subset: v1}
            weight: 75
          timeout: 10s
          retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,503",
                    retryRemoteLocalities: true, backoff: 25ms}
          fault:
            delay: {fixedDelay: 5s, percentage: {value: 0.1}}
            abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}
          mirror: {host: reviews, subset: v3}
          mirrorPercentage: {value: 12.5}
          corsPolicy:
            allowOrigins: [{exact: "https://example.com"}, {regex: "https://.*\\\\.example\\\\.com"}]
            allowMethods: [GET, POST]
            allowHeaders: [x-foo]
            exposeHeaders: ["*"]
            maxAge: 24h
            allowCredentials: false
            unmatchedPreflights: FORWARD
          headers:
            request: {set: {":authority": reviews.example.com}}
        - match: [{uri: {prefix: /old}}]
          redirect: {prefixRewrite: /new, derivePort: FROM_REQUEST_PORT, redirectCode: 308, scheme: https}
        - match: [{uri: {exact: /teapot}}]
          directResponse: {status: 418, body: {string: "I'm a teapot"}}
        - rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: "/v2/\\\\1"}}
          route: [{destination: {host: reviews}}]
          mirrors: [{destination: {host: shadow}, percentage: {value: 5}}]
        tls:
        - match: [{sniHosts: [api.example.com], port: 443, destinationSubnets: [10.0.0.0/8]}]
          route: [{destination: {host: api}}]
        tcp:
        - match: [{port: 3306, sourceSubnet: 10.1.0.0/16}]
          route: [{destination: {host: mysql, port: {number: 3306}}, weight: 100}]
    """,
    "DestinationRule": """
        host: "*.reviews.svc.cluster.local"
        exportTo: ["*"]
        trafficPolicy:
          loadBalancer:
            consistentHash:
              httpCookie: {name: user, ttl: 0s, path: /, attributes: [{name: SameSite, value: Strict}]}
              maglev: {tableSize: "65537"}
            localityLbSetting:
              distribute:
              - from: us-west/zone1/*
                to: {"us-west/zone1/*": 80, "us-west/zone2/*": 20}
            warmup: {duration: 60s, minimumPercent: 10, aggression: 1.5}
          connectionPool:
            tcp: {maxConnections: 100, connectTimeout: 30ms, idleTimeout: 0s,
                  tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}}
            http: {http1MaxPendingRequests: 10, http2MaxRequests: 100, maxRequestsPerConnection: 1,
                   maxRetries: 3, idleTimeout: 1h, h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 10,
                   http2KeepAlive: {interval: 15s, timeout: 5s}}
          outlierDetection: {consecutive5xxErrors: 7, consecutiveGatewayErrors: 5, interval: 5m,
                             baseEjectionTime: 15m, maxEjectionPercent: 100, minHealthPercent: 50,
                             splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2,
                             outlierDetectionHttpErrorCodes: [500, 503]}
          tls: {mode: MUTUAL, credentialName: client-cert, sni: reviews.example.com, subjectAltNames: [a]}
          portLevelSettings:
          - port: {number: 80}
            loadBalancer: {simple: LEAST_REQUEST, warmupDurationSecs: 30s}
          tunnel: {protocol: CONNECT, targetHost: egress.example.com, targetPort: 8443}
          retryBudget: {percent: 20.5, minRetryConcurrency: 3, budgetInterval: 0s}
        subsets:
        - name: v1
          labels: {version: v1}
          trafficPolicy:
            loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 1024}}}
        - name: v2
          labels: {version: v2}
    """,
    "ServiceEntry": """
        hosts: [db.example.com]
        addresses: [10.0.0.0/24, "2001:db8::1"]
        location: MESH_INTERNAL
        resolution: STATIC
        ports:
        - {number: 5432, name: tcp-postgres, protocol: TCP, targetPort: 15432}
        endpoints:
        - {address: 10.0.0.1, ports: {tcp-postgres: 5433}, labels: {app: db}, network: n1,
           locality: us-west/zone1, weight: 2, serviceAccount: db}
        - {address: 10.0.0.2}
        exportTo: ["~"]
        subjectAltNames: [spiffe://cluster.local/ns/db/sa/db]
    """,
    "WorkloadEntry": """
        address: vm1.example.com
        ports: {http: 8080}
        labels: {app: ratings}
        network: vm-net
        locality: us-east/zone1/rack1
        weight: 1
        serviceAccount: ratings
    """,
    "Gateway": """
        selector: {istio: ingressgateway}
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: [bookinfo/bookinfo.example.com, "*"]
          tls: {httpsRedirect: true}
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["./*.example.com", 10.0.0.1]
          tls: {mode: SIMPLE, credentialName: bookinfo-cert, minProtocolVersion: TLSV1_2}
        - port: {number: 8443, name: mtls, protocol: HTTPS}
          hosts: ["*/api.example.com"]
          tls: {mode: MUTUAL, serverCertificate: /etc/cert.pem, privateKey: /etc/key.pem,
                caCertificates: /etc/ca.pem, subjectAltNames: [client],
                cipherSuites: [ECDHE-RSA-AES128-GCM-SHA256]}
        - port: {number: 15443, name: tls, protocol: TLS}
          hosts: ["*.local"]
          tls: {mode: AUTO_PASSTHROUGH}
          name: passthrough
          bind: 0.0.0.0
    """,
    "Sidecar": """
        workloadSelector: {labels: {app: ratings}}
        ingress:
        - port: {number: 9080, protocol: HTTP, name: http}
          defaultEndpoint: 127.0.0.1:8080
          captureMode: IPTABLES
          connectionPool: {http: {maxRetries: 2}}
        - port: {number: 9443, protocol: HTTPS, name: https}
          defaultEndpoint: unix:///var/run/app.sock
          tls: {mode: SIMPLE, serverCertificate: /etc/cert.pem, privateKey: /etc/key.pem}
        egress:
        - port: {number: 3306, protocol: MYSQL, name: mysql}
          bind: 127.0.0.2
          hosts: ["*/mysql.foo.com"]
        - port: {number: 0, protocol: HTTP}
          bind: unix:///var/run/egress.sock
          captureMode: NONE
          hosts: ["~istio-system/*"]
        - hosts: ["./*", istio-system/*]
        inboundConnectionPool: {tcp: {maxConnections: 10}}
        outboundTrafficPolicy:
          mode: ALLOW_ANY
          egressProxy: {host: egress.istio-system.svc.cluster.local, port: {number: 443}}
    """,
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_full_specs_are_valid(kind: str) -> None:
    assert [str(e) for e in errors(kind, VALID[kind])] == []


# (kind, spec with the blamed line marked, path, a stable part of the message)
BAD = [
    # -- VirtualService: weights
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination: {host: reviews}
            weight: 150  # <-
    """, "spec.http[0].route[0].weight", "150 is out of range [0, 100]", id="weight-range"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination: {host: reviews, subset: v1}  # <-
            weight: 60
          - destination: {host: reviews, subset: v2}
            weight: 30
    """, "spec.http[0].route", "total destination weight = 90 != 100", id="weight-sum"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        tcp:
        - route:
          - destination: {host: a}  # <-
          - destination: {host: b}
    """, "spec.tcp[0].route", "total destination weight = 0 != 100", id="weight-missing-with-two"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination: {host: reviews}
            weight: 50  # <-
    """, "spec.http[0].route[0].weight", "total destination weight = 50 != 100", id="weight-single-partial"),
    # -- durations
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          timeout: 10  # <-
    """, "spec.http[0].timeout", "expected a string, got integer", id="timeout-type"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          timeout: 10 seconds  # <-
    """, "spec.http[0].timeout", "invalid duration '10 seconds'", id="timeout-invalid"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          retries:
            attempts: 2
            perTryTimeout: 500us  # <-
    """, "spec.http[0].retries.perTryTimeout", "below the minimum of 1ms", id="per-try-timeout-min"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          timeout: 1.5ms  # <-
    """, "spec.http[0].timeout", "only durations to ms precision are supported", id="timeout-precision"),
    # -- string matches and headers
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - uri:
              exact: /a  # <-
              prefix: /b
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].uri", "exactly one of exact, prefix, regex must be set",
        id="match-two-kinds"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - method: {}  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].method", "exactly one of exact, prefix, regex must be set", id="match-empty"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - uri:
              regex: "/(?=admin)"  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].uri.regex", "which RE2 does not support", id="match-regex-re2"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - headers:
              x-user:
                regex: "[a-"  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].headers.x-user.regex", "invalid regex '[a-'", id="match-regex-invalid"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - authority:
              prefix: ""  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].authority.prefix", "prefix string match should not be empty",
        id="match-empty-prefix"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match:
          - headers:
              "end user": {exact: jason}  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].headers.end user", "header name end user is not a valid header name",
        id="match-header-name"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          headers:
            response:
              set:
                Host: other  # <-
    """, "spec.http[0].headers.response.set.Host", "cannot set Host header", id="headers-host"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination: {host: reviews}
            headers:
              request:
                remove: [":path"]  # <-
    """, "spec.http[0].route[0].headers.request.remove[0]", "header cannot have \":\" prefix",
        id="headers-pseudo"),
    # -- hosts and gateways
    pytest.param("VirtualService", """
        hosts: ["*"]  # <-
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.hosts[0]", "wildcard host * is not allowed for virtual services bound to the mesh gateway",
        id="vs-wildcard-mesh"),
    pytest.param("VirtualService", """
        hosts:
        - "*foo.com"  # <-
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.hosts[0]", "'*' must be a whole leading label", id="vs-partial-wildcard"),
    pytest.param("VirtualService", """
        hosts:
        - a.example.com
        - "*.example.com"  # <-
        gateways: [gw]
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.hosts[1]", "duplicate hosts in virtual service: a.example.com & *.example.com",
        id="vs-dup-hosts"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        gateways:
        - Istio-System/gw  # <-
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.gateways[0]", "invalid value for namespace: 'Istio-System'", id="gateway-ref-namespace"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        gateways: [mesh]
        http:
        - match:
          - gateways:
            - istio-system/  # <-
          route: [{destination: {host: reviews}}]
    """, "spec.http[0].match[0].gateways[0]", "config namespace and gateway name cannot be empty",
        id="gateway-ref-empty"),
    pytest.param("VirtualService", """
        hosts: [reviews]  # <-
    """, "spec", "http, tcp or tls must be provided in virtual service", id="vs-no-routes"),
    pytest.param("VirtualService", """
        gateways: [gw]  # <-
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.gateways", "delegate virtual service must have no gateways specified",
        id="vs-delegate-gateways"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        exportTo:
        - foo
        - foo  # <-
        http:
        - route: [{destination: {host: reviews}}]
    """, "spec.exportTo[1]", "duplicate entries in exportTo for entry foo", id="vs-export-dup"),
    # -- destinations
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination:
              host: reviews
              port:
                number: 0  # <-
    """, "spec.http[0].route[0].destination.port.number", "0 is out of range [1, 65535]",
        id="destination-port"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination:
              host: "*"  # <-
    """, "spec.http[0].route[0].destination.host", "invalid destination host *", id="destination-wildcard"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination:
              host: reviews
              subset: V1  # <-
    """, "spec.http[0].route[0].destination.subset", "subset name is invalid: 'V1'", id="destination-subset"),
    # -- what an HTTP route does
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - redirect: {uri: /v2}
          route:
          - destination: {host: reviews}  # <-
    """, "spec.http[0].route", "HTTP route cannot contain both route and redirect", id="route-and-redirect"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - match: [{uri: {prefix: /}}]  # <-
          timeout: 1s
    """, "spec.http[0]", "HTTP route, redirect or direct_response is required", id="route-no-action"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          mirror: {host: shadow}
          mirrors:
          - destination: {host: shadow2}  # <-
    """, "spec.http[0].mirrors", "HTTP route cannot contain both mirror and mirrors",
        id="mirror-and-mirrors"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          mirror: {host: shadow}
          mirrorPercentage:
            value: 100.5  # <-
    """, "spec.http[0].mirrorPercentage.value", "100.5 is out of range [0, 100]", id="mirror-percentage"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - redirect:
            uri: /v2
            redirectCode: 200  # <-
    """, "spec.http[0].redirect.redirectCode", "200 is not a valid redirect code, must be 3xx",
        id="redirect-code"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - redirect:
            uri: /v2  # <-
            port: 80
            derivePort: FROM_REQUEST_PORT
    """, "spec.http[0].redirect", "only one of port, derivePort may be set", id="redirect-port-oneof"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - directResponse:
            status: 99  # <-
    """, "spec.http[0].directResponse.status", "HTTP status 99 is not in range 200-599",
        id="direct-response"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          rewrite:
            uri: /v2
            uriRegexRewrite: {match: "^/v1", rewrite: /v2}  # <-
    """, "spec.http[0].rewrite.uriRegexRewrite", "rewrite may only contain one of URI or UriRegexRewrite",
        id="rewrite-both"),
    # -- retries
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          retries:
            attempts: -1  # <-
    """, "spec.http[0].retries.attempts", "-1 is out of range [0, 2147483647]", id="retries-negative"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          retries:
            attempts: 3
            retryOn: 5xx,sometimes  # <-
    """, "spec.http[0].retries.retryOn", "'sometimes' is not a valid retryOn policy", id="retry-on"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          retries:
            retryOn: 5xx  # <-
    """, "spec.http[0].retries.attempts", "http retry policy configured when attempts are set to 0",
        id="retries-without-attempts"),
    # -- fault injection
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault:
            delay:
              fixedDelay: 7s
              percentage:
                value: 150  # <-
    """, "spec.http[0].fault.delay.percentage.value", "150 is out of range [0, 100]", id="fault-percentage"),
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault:
            delay:
              percent: 120  # <-
              fixedDelay: 7s
    """, "spec.http[0].fault.delay.percent", "120 is out of range [0, 100]", id="fault-legacy-percent"),
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault:
            delay:
              percentage: {value: 10}  # <-
    """, "spec.http[0].fault.delay.fixedDelay", "delay requires fixedDelay", id="fault-delay-no-duration"),
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault:
            abort:
              httpStatus: 700  # <-
    """, "spec.http[0].fault.abort.httpStatus", "HTTP status 700 is not in range 200-599",
        id="fault-abort-status"),
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault:
            abort:
              grpcStatus: NOPE  # <-
    """, "spec.http[0].fault.abort.grpcStatus", "gRPC status 'NOPE' is not supported", id="fault-abort-grpc"),
    pytest.param("VirtualService", """
        hosts: [ratings]
        http:
        - route: [{destination: {host: ratings}}]
          fault: {}  # <-
    """, "spec.http[0].fault", "HTTP fault injection must have an abort and/or a delay", id="fault-empty"),
    # -- CORS
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          corsPolicy:
            allowMethods: [GET, FETCH]  # <-
    """, "spec.http[0].corsPolicy.allowMethods[1]", "'FETCH' is not a supported HTTP method",
        id="cors-method"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          corsPolicy:
            maxAge: 1500ms  # <-
    """, "spec.http[0].corsPolicy.maxAge", "max_age duration is accurate only to seconds precision",
        id="cors-max-age"),
    # -- TLS and TCP routes
    pytest.param("VirtualService", """
        hosts: [api.example.com]
        tls:
        - route: [{destination: {host: api}}]  # <-
    """, "spec.tls[0].match", "required field is missing", id="tls-route-no-match"),
    pytest.param("VirtualService", """
        hosts: [api.example.com]
        tls:
        - match:
          - port: 443  # <-
          route: [{destination: {host: api}}]
    """, "spec.tls[0].match[0].sniHosts", "required field is missing", id="tls-match-no-sni"),
    pytest.param("VirtualService", """
        hosts: [api.example.com]
        tls:
        - match:
          - sniHosts: [api.example.com, other.example.com]  # <-
          route: [{destination: {host: api}}]
    """, "spec.tls[0].match[0].sniHosts[1]", "SNI host 'other.example.com' is not a compatible subset",
        id="tls-sni-subset"),
    pytest.param("VirtualService", """
        hosts: [mysql]
        tcp:
        - match:
          - destinationSubnets: [10.0.0.0/33]  # <-
          route: [{destination: {host: mysql}}]
    """, "spec.tcp[0].match[0].destinationSubnets[0]", "'10.0.0.0/33' is not an IP address or CIDR block",
        id="tcp-subnet"),
    pytest.param("VirtualService", """
        hosts: [mysql]
        tcp:
        - match: [{port: 3306}]  # <-
    """, "spec.tcp[0].route", "required field is missing", id="tcp-no-route"),
    # -- DestinationRule
    pytest.param("DestinationRule", """
        subsets: [{name: v1}]  # <-
    """, "spec.host", "required field is missing", id="dr-no-host"),
    pytest.param("DestinationRule", """
        host: a.*.example.com  # <-
    """, "spec.host", "'*' is only allowed as the first label", id="dr-host-wildcard"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          tls:
            mode: MUTUAL  # <-
            privateKey: /etc/key.pem
    """, "spec.trafficPolicy.tls.clientCertificate", "client certificate required for mutual tls",
        id="tls-mutual-no-cert"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          tls:
            mode: ISTIO_MUTUAL
            caCertificates: /etc/ca.pem  # <-
    """, "spec.trafficPolicy.tls.caCertificates", "ISTIO_MUTUAL TLS cannot have associated CA certificates",
        id="tls-istio-mutual-certs"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          tls:
            mode: STRICT  # <-
    """, "spec.trafficPolicy.tls.mode", "'STRICT' is not one of DISABLE, ISTIO_MUTUAL, MUTUAL, SIMPLE",
        id="tls-mode"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            simple: ROUND_ROBIN  # <-
            consistentHash: {useSourceIp: true}
    """, "spec.trafficPolicy.loadBalancer", "only one of simple, consistentHash may be set", id="lb-oneof"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            simple: FASTEST  # <-
    """, "spec.trafficPolicy.loadBalancer.simple", "'FASTEST' is not one of", id="lb-simple"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            consistentHash:
              httpHeaderName: x-user  # <-
              httpQueryParameterName: user
    """, "spec.trafficPolicy.loadBalancer.consistentHash",
        "only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName may be set",
        id="hash-key"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            consistentHash:
              httpCookie:
                ttl: 0s  # <-
    """, "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name", "required field is missing",
        id="hash-cookie-name"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            consistentHash:
              useSourceIp: true
              maglev:
                tableSize: 1000  # <-
    """, "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "tableSize must be a prime number for maglev", id="hash-maglev"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            consistentHash:
              useSourceIp: true
              ringHash:
                minimumRingSize: lots  # <-
    """, "spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
        "expected an integer or a decimal string, got 'lots'", id="hash-ring-size"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            localityLbSetting:
              distribute:
              - from: us-west/zone1/*
                to:
                  "us-west/zone1/*": 80  # <-
                  "us-west/zone2/*": 10
    """, "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
        "total locality weight 90 != 100", id="locality-weights"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          outlierDetection: {consecutive5xxErrors: 5}
          loadBalancer:
            localityLbSetting:
              distribute: [{from: us-west, to: {us-east: 100}}]  # <-
              failover: [{from: us-west, to: us-east}]
    """, "spec.trafficPolicy.loadBalancer.localityLbSetting",
        "can not simultaneously specify 'distribute' and 'failover'", id="locality-distribute-failover"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          outlierDetection:
            maxEjectionPercent: 150  # <-
    """, "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "150 is out of range [0, 100]",
        id="outlier-ejection-percent"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          outlierDetection:
            consecutive5xxErrors: -1  # <-
    """, "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "-1 is out of range [0, 4294967295]",
        id="outlier-consecutive"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          outlierDetection:
            interval: 0s  # <-
    """, "spec.trafficPolicy.outlierDetection.interval", "below the minimum of 1ms", id="outlier-interval"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          outlierDetection:
            consecutiveLocalOriginFailures: 3  # <-
    """, "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        "split external local origin errors is set to false", id="outlier-local-origin"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          connectionPool:
            tcp:
              connectTimeout: 1 min  # <-
    """, "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "invalid duration '1 min'",
        id="pool-connect-timeout"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          connectionPool:
            http:
              http2MaxRequests: -5  # <-
    """, "spec.trafficPolicy.connectionPool.http.http2MaxRequests", "-5 is out of range [0, 2147483647]",
        id="pool-http2-max"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          connectionPool:
            http:
              h2UpgradePolicy: UPGRADE
              useClientProtocol: true  # <-
    """, "spec.trafficPolicy.connectionPool.http.useClientProtocol",
        "use client protocol must not be true when H2UpgradePolicy is UPGRADE", id="pool-h2-upgrade"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          connectionPool: {}  # <-
    """, "spec.trafficPolicy.connectionPool", "connection pool must have at least one field",
        id="pool-empty"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy: {}  # <-
    """, "spec.trafficPolicy", "traffic policy must have at least one field", id="policy-empty"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          portLevelSettings:
          - port:
              number: 70000  # <-
            tls: {mode: SIMPLE}
    """, "spec.trafficPolicy.portLevelSettings[0].port.number", "70000 is out of range [1, 65535]",
        id="port-level-port"),
    pytest.param("DestinationRule", """
        host: reviews
        subsets:
        - name: v1
          labels:
            version: "v 1"  # <-
    """, "spec.subsets[0].labels.version", "invalid label value 'v 1'", id="subset-labels"),
    pytest.param("DestinationRule", """
        host: reviews
        subsets:
        - name: v1
        - name: v1  # <-
    """, "spec.subsets[1].name", "duplicate subset names: v1", id="subset-dup"),
    # -- ServiceEntry
    pytest.param("ServiceEntry", """
        hosts: ["*"]  # <-
    """, "spec.hosts[0]", "hostname cannot be wildcard", id="se-wildcard"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        resolution: AUTO  # <-
    """, "spec.resolution", "'AUTO' is not one of DNS, DNS_ROUND_ROBIN, DYNAMIC_DNS, NONE, STATIC",
        id="se-resolution"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        location: OUTSIDE  # <-
    """, "spec.location", "'OUTSIDE' is not one of MESH_EXTERNAL, MESH_INTERNAL", id="se-location"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        ports:
        - {number: 80, name: http, protocol: HTTP}
        - {number: 80, name: http-alt, protocol: HTTP}  # <-
    """, "spec.ports[1].number", "service entry port 80 already defined", id="se-dup-number"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        ports:
        - {number: 80, name: http, protocol: HTTP}
        - {number: 8080, name: http, protocol: HTTP}  # <-
    """, "spec.ports[1].name", "service entry port name 'http' already defined", id="se-dup-name"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        ports:
        - number: 80
          name: http
          protocol: FTP  # <-
    """, "spec.ports[0].protocol", "unsupported protocol: FTP", id="se-protocol"),
    pytest.param("ServiceEntry", """
        hosts: [db.example.com]
        resolution: STATIC
        endpoints:
        - address: db1.example.com  # <-
    """, "spec.endpoints[0].address", "endpoint address 'db1.example.com' is not a valid IP address",
        id="se-static-ip"),
    pytest.param("ServiceEntry", """
        hosts: [db.example.com]  # <-
        resolution: STATIC
    """, "spec.endpoints", "endpoints must be provided if service entry discovery mode is static",
        id="se-static-no-endpoints"),
    pytest.param("ServiceEntry", """
        hosts:
        - "*.example.com"  # <-
        resolution: DNS
    """, "spec.hosts[0]", "hosts must be FQDN or contain only prefix wildcards", id="se-dns-wildcard"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        resolution: DNS
        endpoints:
        - address: "api example"  # <-
    """, "spec.endpoints[0].address", "endpoint address 'api example' is not a valid FQDN or an IP address",
        id="se-dns-endpoint"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        addresses:
        - 10.0.0.0/8  # <-
        resolution: DNS
    """, "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types",
        id="se-cidr-dns"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        addresses:
        - 300.1.1.1  # <-
    """, "spec.addresses[0]", "'300.1.1.1' is not an IP address or CIDR block", id="se-address"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        endpoints:
        - address: 10.0.0.1  # <-
    """, "spec.endpoints", "no endpoints should be provided for resolution type none",
        id="se-none-endpoints"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        resolution: STATIC
        ports: [{number: 80, name: http}]
        endpoints:
        - address: 10.0.0.1
          ports:
            grpc: 9090  # <-
    """, "spec.endpoints[0].ports.grpc", "endpoint port 9090 is not defined by the service entry",
        id="se-endpoint-port"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]  # <-
        resolution: STATIC
        workloadSelector: {labels: {app: api}}
        endpoints: [{address: 10.0.0.1}]
    """, "spec", "only one of workloadSelector, endpoints may be set", id="se-selector-and-endpoints"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        exportTo:
        - "~"  # <-
        - other
    """, "spec.exportTo", "cannot export service entry to no one (~) and someone", id="se-export-none"),
    # -- WorkloadEntry
    pytest.param("WorkloadEntry", """
        labels: {app: vm}  # <-
    """, "spec.address", "address is required", id="we-no-address"),
    pytest.param("WorkloadEntry", """
        address: 10.0.0.1
        ports:
          http: 70000  # <-
    """, "spec.ports.http", "70000 is out of range [1, 65535]", id="we-port"),
    pytest.param("WorkloadEntry", """
        address: 10.0.0.1
        ports:
          HTTP_1: 80  # <-
    """, "spec.ports.HTTP_1", "invalid port name: HTTP_1", id="we-port-name"),
    pytest.param("WorkloadEntry", """
        address: unix://relative.sock  # <-
    """, "spec.address", "relative.sock is not an absolute path to a file", id="we-uds"),
    pytest.param("WorkloadEntry", """
        address: 10.0.0.1
        weight: -1  # <-
    """, "spec.weight", "-1 is out of range [0, 4294967295]", id="we-weight"),
    # -- Gateway
    pytest.param("Gateway", """
        selector: {istio: ingressgateway}  # <-
    """, "spec.servers", "gateway must have at least one server", id="gw-no-servers"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts:
          - bookinfo  # <-
    """, "spec.servers[0].hosts[0]", "short names (non FQDN) are not allowed", id="gw-short-host"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts:
          - Bookinfo/bookinfo.example.com  # <-
    """, "spec.servers[0].hosts[0]", "invalid namespace value 'Bookinfo' in gateway", id="gw-host-namespace"),
    pytest.param("Gateway", """
        servers:
        - port:
            number: 21
            name: ftp
            protocol: FTP  # <-
          hosts: ["*"]
    """, "spec.servers[0].port.protocol", "invalid protocol 'FTP'", id="gw-protocol"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}  # <-
          hosts: ["*"]
    """, "spec.servers[0].tls", "server must have TLS settings for HTTPS/TLS protocols",
        id="gw-https-no-tls"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["*"]
          tls:
            mode: SIMPLE  # <-
            privateKey: /etc/key.pem
    """, "spec.servers[0].tls.serverCertificate", "SIMPLE TLS requires a server certificate",
        id="gw-simple-no-cert"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["*"]
          tls:
            mode: MUTUAL  # <-
            serverCertificate: /etc/cert.pem
            privateKey: /etc/key.pem
    """, "spec.servers[0].tls.caCertificates", "MUTUAL TLS requires a client CA bundle",
        id="gw-mutual-no-ca"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["*"]
          tls:
            mode: ISTIO_MUTUAL
            credentialName: cert  # <-
    """, "spec.servers[0].tls.credentialName", "ISTIO_MUTUAL TLS cannot have associated credentialName",
        id="gw-istio-mutual"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["*"]
          tls:
            mode: OPTIONAL  # <-
    """, "spec.servers[0].tls.mode", "'OPTIONAL' is not one of AUTO_PASSTHROUGH, ISTIO_MUTUAL, MUTUAL",
        id="gw-tls-mode"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
          tls:
            mode: SIMPLE  # <-
            credentialName: cert
    """, "spec.servers[0].tls", "server cannot have TLS settings for plain text HTTP ports",
        id="gw-http-tls"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
        - port:
            number: 8080
            name: http  # <-
            protocol: HTTP
          hosts: ["*"]
    """, "spec.servers[1].port.name", "port names in servers must be unique: duplicate name http",
        id="gw-dup-port-name"),
    pytest.param("Gateway", """
        servers:
        - port:
            number: 80  # <-
            protocol: HTTP
          hosts: ["*"]
    """, "spec.servers[0].port.name", "required field is missing", id="gw-port-name"),
    # -- Sidecar
    pytest.param("Sidecar", """
        egress:
        - hosts:
          - istio.io  # <-
    """, "spec.egress[0].hosts[0]", "host must be of form namespace/dnsName", id="sidecar-egress-host"),
    pytest.param("Sidecar", """
        egress:
        - hosts:
          - "Bad_NS/*"  # <-
    """, "spec.egress[0].hosts[0]", "invalid namespace value 'Bad_NS' in sidecar", id="sidecar-egress-ns"),
    pytest.param("Sidecar", """
        egress:
        - port: {number: 80, protocol: HTTP, name: http}  # <-
    """, "spec.egress[0].hosts", "required field is missing", id="sidecar-egress-no-hosts"),
    pytest.param("Sidecar", """
        egress:
        - hosts: ["*/*"]
          captureMode: EBPF  # <-
    """, "spec.egress[0].captureMode", "'EBPF' is not one of DEFAULT, IPTABLES, NONE", id="sidecar-capture"),
    pytest.param("Sidecar", """
        egress:
        - hosts: ["./*"]  # <-
        - port: {number: 80, protocol: HTTP}
          hosts: ["*/*"]
    """, "spec.egress[0]", "egress listener with empty port should be the last listener",
        id="sidecar-catch-all"),
    pytest.param("Sidecar", """
        egress:
        - port: {number: 0, protocol: HTTP}
          bind: 127.0.0.1  # <-
          hosts: ["*/*"]
    """, "spec.egress[0].bind", "ports with 0 value must have a unix domain socket bind address",
        id="sidecar-uds"),
    pytest.param("Sidecar", """
        ingress:
        - defaultEndpoint: 127.0.0.1:8080  # <-
    """, "spec.ingress[0].port", "required field is missing", id="sidecar-ingress-port"),
    pytest.param("Sidecar", """
        ingress:
        - port: {number: 9080, protocol: HTTP}
          defaultEndpoint: 10.0.0.1:8080  # <-
    """, "spec.ingress[0].defaultEndpoint", "defaultEndpoint must be of form 127.0.0.1:<port>",
        id="sidecar-default-endpoint"),
    pytest.param("Sidecar", """
        ingress:
        - port: {number: 9080, protocol: HTTP}
        - port: {number: 9080, protocol: HTTP}  # <-
    """, "spec.ingress[1].port", "sidecar: ports on IP bound listeners must be unique",
        id="sidecar-dup-port"),
    pytest.param("Sidecar", """
        ingress:
        - port:
            number: 9443
            protocol: HTTPS
          tls:
            mode: SIMPLE
            credentialName: cert  # <-
    """, "spec.ingress[0].tls.credentialName", "sidecar: credentialName is not currently supported",
        id="sidecar-ingress-tls"),
    pytest.param("Sidecar", """
        outboundTrafficPolicy:
          mode: ALLOW_ALL  # <-
    """, "spec.outboundTrafficPolicy.mode", "'ALLOW_ALL' is not one of ALLOW_ANY, REGISTRY_ONLY",
        id="sidecar-outbound-mode"),
    pytest.param("Sidecar", """
        outboundTrafficPolicy:
          mode: REGISTRY_ONLY
          egressProxy:
            host: egress.example.com  # <-
            port: {number: 443}
    """, "spec.outboundTrafficPolicy.egressProxy",
        "egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode",
        id="sidecar-egress-proxy"),
    pytest.param("Sidecar", """
        inboundConnectionPool:
          tcp:
            maxConnections: -1  # <-
    """, "spec.inboundConnectionPool.tcp.maxConnections", "-1 is out of range [0, 2147483647]",
        id="sidecar-inbound-pool"),
    pytest.param("Sidecar", """
        workloadSelector:  # <-
          labels: {app: ratings}
    """, "spec", "sidecar: empty configuration provided", id="sidecar-empty"),
    # -- unknown fields, at every depth
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route:
          - destination:
              hots: reviews  # <-
              host: reviews
    """, "spec.http[0].route[0].destination.hots", "unknown field 'hots'", id="unknown-destination"),
    pytest.param("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews}}]
          retry: {attempts: 3}  # <-
    """, "spec.http[0].retry", "unknown field 'retry'", id="unknown-http-route"),
    pytest.param("DestinationRule", """
        host: reviews
        trafficPolicy:
          loadBalancer:
            simpel: ROUND_ROBIN  # <-
    """, "spec.trafficPolicy.loadBalancer.simpel", "unknown field 'simpel'", id="unknown-lb"),
    pytest.param("ServiceEntry", """
        hosts: [api.example.com]
        resolution: DNS
        endpoints:
        - address: api.example.com
          port: 80  # <-
    """, "spec.endpoints[0].port", "unknown field 'port'", id="unknown-endpoint"),
    pytest.param("WorkloadEntry", """
        address: 10.0.0.1
        ip: 10.0.0.1  # <-
    """, "spec.ip", "unknown field 'ip'", id="unknown-workload-entry"),
    pytest.param("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP, nmber: 81}  # <-
          hosts: ["*"]
    """, "spec.servers[0].port.nmber", "unknown field 'nmber'", id="unknown-gateway-port"),
    pytest.param("Sidecar", """
        egress:
        - hosts: ["*/*"]
          localhost: {}  # <-
    """, "spec.egress[0].localhost", "unknown field 'localhost'", id="unknown-sidecar"),
]


@pytest.mark.parametrize(("kind", "spec", "path", "message"), BAD)
def test_bad_spec_names_field_line_and_reason(kind: str, spec: str, path: str, message: str) -> None:
    found = errors(kind, spec)
    assert len(found) == 1, [str(e) for e in found]
    error = found[0]
    assert (error.path, error.line, error.kind, error.file) == (path, marked_line(kind, spec), kind, "t.yaml")
    assert message in error.message


def test_gateway_names_must_be_dns_labels() -> None:
    text = document("Gateway", """
        servers:
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
    """, name="ingress.v2")
    [error] = load_text(text, "t.yaml").errors
    assert (error.path, error.line) == ("metadata.name", 4)
    assert error.message == "invalid gateway name: 'ingress.v2'"


def test_semantic_checks_tolerate_wrong_types() -> None:
    """A field of the wrong type is reported once; the checks that read it do not crash or pile on."""
    found = errors("VirtualService", """
        hosts: reviews
        http:
        - route:
          - {destination: {host: reviews}, weight: "50"}
          - {destination: {host: reviews}, weight: 50}
    """)
    assert sorted((e.path, e.message) for e in found) == [
        ("spec.hosts", "expected a list, got string"),
        ("spec.http[0].route[0].weight", "expected an integer, got string"),
    ]


def test_warnings_do_not_block_loading() -> None:
    result = load_text(document("VirtualService", """
        hosts: [reviews]
        gateways: [gateway.istio-system]
        http:
        - route: [{destination: {host: reviews}}]
          mirror: {host: shadow}
          mirrorPercent: 10
    """), "t.yaml")
    assert result.errors == []
    assert [r.kind for r in result.resources] == ["VirtualService"]
    assert sorted(d.path for d in result.diagnostics) == ["spec.gateways[0]", "spec.http[0].mirrorPercent"]
