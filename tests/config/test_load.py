"""Loading Istio's own samples: everything validates, versions normalise, unknown kinds warn."""

from __future__ import annotations

from controlplane.config.validate import load_paths, load_text

VS = """apiVersion: networking.istio.io/{version}
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
"""


def test_every_bookinfo_and_validation_file_loads(istio_testdata) -> None:
    result = load_paths([istio_testdata / "bookinfo", istio_testdata / "validation"])
    assert result.errors == [], [str(d) for d in result.errors]
    kinds = {r.kind for r in result.resources}
    assert {"VirtualService", "DestinationRule", "ServiceEntry", "Gateway", "Sidecar", "WorkloadEntry",
            "PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication", "Service",
            "Deployment", "ServiceAccount"} <= kinds
    unsupported = {d.kind for d in result.diagnostics if d.code == "ZM0001"}
    assert unsupported == {"EnvoyFilter", "WorkloadGroup", "ProxyConfig", "Telemetry", "WasmPlugin",
                           "TrafficExtension"}
    assert all(d.level == "Warning" for d in result.diagnostics if d.code == "ZM0001")


def test_api_versions_normalise_to_one_form() -> None:
    forms = []
    for version in ("v1alpha3", "v1beta1", "v1"):
        [r] = load_text(VS.format(version=version), f"{version}.yaml").resources
        forms.append((r.normalized(), r.content_hash))
    assert forms[0] == forms[1] == forms[2]
    assert forms[0][0]["group"] == "networking.istio.io"


def test_a_kind_in_the_wrong_version_is_an_error_naming_the_versions() -> None:
    [d] = load_text(VS.format(version="v2"), "x.yaml").diagnostics
    assert d.level == "Error" and d.path == "apiVersion" and d.line == 1
    assert "networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1" in d.message


def test_envelope_errors_are_precise() -> None:
    cases = {
        "kind: VirtualService\nmetadata: {name: x}\n": ("apiVersion", "apiVersion is missing"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {}\n":
            ("metadata.name", "metadata.name is required"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: Bad_Name}\n":
            ("metadata.name", "DNS-1123 subdomain"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata:\n  name: x\n  labels: {'a b': c}\n":
            ("metadata.labels.a b", "invalid label key"),
        "- just\n- a list\n": ("", "a resource must be a mapping"),
    }
    for text, (path, message) in cases.items():
        errors = load_text(text, "x.yaml").errors
        assert errors and errors[0].path == path and message in errors[0].message, (text, errors)
