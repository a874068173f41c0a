"""security.istio.io: PeerAuthentication, AuthorizationPolicy, RequestAuthentication.

Fields follow istio/api security/v1beta1 (v1 is the same schema). Semantic checks are
those of Istio's CRD rules and pkg/config/validation (validateAuthorizationPolicy,
ValidatePeerAuthentication, ValidateRequestAuthentication), with Istio's wording where
it reads well, so a policy zmesh accepts is one Istio accepts too.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from controlplane.config.schema import AnyValue, Bool, Check, List, Map, Obj, Report, Str, Type
from controlplane.config.validators import Duration, Labels, check_cidr
from controlplane.config.yamlload import Path

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")


def _items(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """The mapping items of a list: spec-level checks run even when a child had a type error."""
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)] if isinstance(value, list) else []


def _at_most(limit: int) -> Check:
    """Istio's CRD MaxItems, which bounds config size."""

    def check(items: list[Any], path: Path, report: Report) -> None:
        if len(items) > limit:
            report.error(path, f"must have at most {limit} items, found {len(items)}")

    return check


def _non_empty(message: str) -> Check:
    """An explicitly empty list where Istio reads that as a mistake rather than "unset"."""

    def check(items: list[Any], path: Path, report: Report) -> None:
        if not items:
            report.error(path, message)

    return check


# --- selectors and target references, shared by the three kinds -----------------------------------

def _check_selector(selector: dict[str, Any], path: Path, report: Report) -> None:
    if not selector.get("matchLabels"):
        report.warning(path, "workload selector specified without labels")


# (canonical group, kind) a policy may attach to; group "" means core.
TARGET_KINDS = (("core", "Service"), ("networking.istio.io", "ServiceEntry"),
                ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass"))


def _check_target_ref(ref: dict[str, Any], path: Path, report: Report) -> None:
    namespace = ref.get("namespace")
    if isinstance(namespace, str) and namespace:
        report.error((*path, "namespace"),
                     "targetRef namespace must not be set; cross namespace referencing is not supported")
    group, kind = ref.get("group") or "", ref.get("kind")
    if not (isinstance(group, str) and isinstance(kind, str) and kind):
        return  # reported by the field types
    if (group or "core", kind) not in TARGET_KINDS:
        allowed = ", ".join(f"{g}/{k}" for g, k in TARGET_KINDS)
        report.error((*path, "kind"), f"targetRef must be to one of {allowed} but was {group}/{kind}")


def _check_one_target(spec: dict[str, Any], path: Path, report: Report) -> None:
    present = [f for f in spec if f in ("selector", "targetRef", "targetRefs") and spec[f] is not None]
    if len(present) > 1:
        report.error((*path, present[1]),
                     f"only one of targetRefs or selector can be set (found {', '.join(present)})")


_selector = Obj({"matchLabels": Labels()}, checks=(_check_selector,))
_target_ref = Obj({"group": Str(), "kind": Str(), "name": Str(), "namespace": Str()},
                  required=("kind", "name"), checks=(_check_target_ref,))
_target_refs = List(_target_ref, checks=(_at_most(16),))

# --- PeerAuthentication ---------------------------------------------------------------------------


def _check_port_key(key: Any, path: Path, report: Report) -> None:
    """portLevelMtls keys: YAML reads `8080:` as an integer and `"8080":` as a string; both are ports."""
    text = str(key)
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 65535:
        report.error(path, f"port {text!r} must be between 1-65535")


def _check_peer_authentication(spec: dict[str, Any], path: Path, report: Report) -> None:
    port_level = spec.get("portLevelMtls")
    if not isinstance(port_level, dict):
        return
    selector = spec.get("selector")
    if not port_level:
        report.error((*path, "portLevelMtls"), "port level mTLS, if defined, must have at least one element")
    elif not (isinstance(selector, dict) and selector.get("matchLabels")):
        # A mesh- or namespace-wide policy has no single workload whose ports these could be.
        report.error((*path, "portLevelMtls"), "portLevelMtls requires selector")


_mtls = Obj({"mode": Str(enum=MTLS_MODES)})

# --- AuthorizationPolicy --------------------------------------------------------------------------


def _check_wildcard(value: str, path: Path, report: Report) -> None:
    """Istio matches exact, prefix `abc*`, suffix `*abc` and presence `*`: one `*`, at an end."""
    count = value.count("*")
    if count > 1:
        report.error(path, f"at most one wildcard is allowed, found {value!r}")
    elif count == 1 and not (value.startswith("*") or value.endswith("*")):
        report.error(path, f"wildcard is only allowed at the start or end, found {value!r}")


def _check_trust_domain(value: str, path: Path, report: Report) -> None:
    _check_wildcard(value, path, report)
    if "/" in value:
        report.error(path, f"trust domain must not contain '/', found {value!r}")


def _check_service_account(value: str, path: Path, report: Report) -> None:
    """`namespace/serviceAccount` or `serviceAccount`, matched exactly (no wildcards)."""
    if "*" in value:
        report.error(path, f"wildcard not allowed in service account {value!r}")
    elif value.count("/") > 1 or value.startswith("/") or value.endswith("/"):
        report.error(path, f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {value!r}")
    elif len(value) > 320:
        report.error(path, "service account cannot exceed 320 characters")


def _check_port_string(value: str, path: Path, report: Report) -> None:
    if not re.fullmatch(r"[0-9]+", value) or int(value) > 65535:
        report.error(path, f"bad port ({value}): must be a number in 0..65535")


_PATH_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")  # RFC 3986 pchar, as Envoy requires


def _check_path_template(value: str, path: Path, report: Report) -> None:
    """Paths with `{*}`/`{**}` become Envoy URI templates, which Envoy rejects unless well-formed."""
    templated = "{*}" in value or "{**}" in value
    seen_match_any = False
    for glob in value.strip("/").split("/"):
        if glob in ("{*}", "{**}"):
            if seen_match_any:
                report.error(path, f"invalid or unsupported path {value!r}: {{**}} is not the last operator")
                return
            seen_match_any = glob == "{**}"
        elif "{" in glob or "}" in glob:
            report.error(path, f"invalid or unsupported path {value!r}: contains '{{' or '}}' "
                               "beyond a supported path template")
            return
        elif templated and not _PATH_LITERAL.fullmatch(glob):
            report.error(path, f"invalid or unsupported path {value!r}: segment {glob!r} "
                               "is not a valid string literal")
            return


# Condition keys Istio supports, and how it checks their values (None: any non-empty string).
CONDITION_KEYS: dict[str, Check | None] = {
    "source.ip": check_cidr, "remote.ip": check_cidr, "destination.ip": check_cidr,
    "destination.port": _check_port_string, "source.serviceAccount": _check_service_account,
    "source.trustDomain": _check_wildcard, "source.namespace": None, "source.principal": None,
    "request.auth.principal": None, "request.auth.audiences": None, "request.auth.presenter": None,
    "connection.sni": None,
}
_MAP_KEY_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
_MAP_KEY = re.compile(r"(request\.headers|request\.auth\.claims|experimental\.envoy\.filters\.[^\[]+)\[.+\]")
# Keys CUSTOM (external authorization) cannot see: they come from mTLS peers or JWTs.
_CUSTOM_SOURCE_FIELDS = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
                         "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts",
                         "trustDomains", "notTrustDomains")
_CUSTOM_KEYS = ("source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal")
# Source fields that also apply to TCP traffic (the rest need HTTP).
_TCP_SOURCE_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
                      "notServiceAccounts", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_DENY_HTTP_ONLY = ("configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to "
                   "the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify "
                   "the port")


def _check_condition_key(key: str, path: Path, report: Report) -> None:
    if key in CONDITION_KEYS or _MAP_KEY.fullmatch(key):
        return
    if key.startswith(_MAP_KEY_PREFIXES):
        report.error(path, f"bad key ({key}): should have format a[b]")
    elif key == "destination.namespace":
        report.error(path, f"attribute {key} is replaced by the metadata.namespace")
    elif key.startswith("destination.labels"):
        report.error(path, f"attribute {key} is replaced by the workload selector")
    elif key in ("destination.name", "destination.user"):
        report.error(path, f"deprecated attribute {key}: only supported in v1alpha1")
    else:
        report.error(path, f"unknown attribute: {key}")


def _check_condition(cond: dict[str, Any], path: Path, report: Report) -> None:
    key = cond.get("key")
    if not isinstance(key, str) or not key:
        return  # reported as a missing required field
    if not cond.get("values") and not cond.get("notValues"):
        report.error(path, f"at least one of `values` or `notValues` must be set for key {key}")
    check = CONDITION_KEYS.get(key)
    if check is None:
        return
    for name in ("values", "notValues"):
        values = cond.get(name)
        for i, value in enumerate(values if isinstance(values, list) else ()):
            if isinstance(value, str) and value:  # empty strings are reported by the item type
                check(value, (*path, name, i), report)


def _only_empty_known_fields(value: dict[str, Any], known: tuple[str, ...]) -> bool:
    """True for `{}` or all-empty fields; an unknown (mistyped) field is reported on its own instead."""
    return set(value) <= set(known) and not any(value.values())


def _check_source(source: dict[str, Any], path: Path, report: Report) -> None:
    if _only_empty_known_fields(source, _SOURCE_FIELDS):
        report.error(path, "`from.source` must not be empty")
        return
    accounts = next((f for f in ("serviceAccounts", "notServiceAccounts") if source.get(f)), None)
    identities = ("principals", "notPrincipals", "namespaces", "notNamespaces")
    if accounts and any(source.get(f) for f in identities):
        report.error((*path, accounts), "cannot set serviceAccounts with namespaces or principals")


def _check_operation(operation: dict[str, Any], path: Path, report: Report) -> None:
    if _only_empty_known_fields(operation, _OPERATION_FIELDS):
        report.error(path, "`to.operation` must not be empty")


def _needs(name: str, message: str) -> Check:
    def check(value: dict[str, Any], path: Path, report: Report) -> None:
        if value.get(name) is None:
            report.error(path, message)

    return check


def _never_triggered(action: str) -> str:
    return (f"{action} action without `rules` is meaningless as it will never be triggered, "
            "add an empty rule `{}` if you want it to be triggered for every request")


def _check_custom(spec: dict[str, Any], path: Path, report: Report) -> None:
    """CUSTOM hands the request to an extension provider that sees only what it is sent."""
    rules = spec.get("rules")
    if not rules:
        report.error((*path, "action"), _never_triggered("CUSTOM"))
    provider = spec.get("provider")
    if provider is None:
        report.error((*path, "provider"), "`provider.name` must not be empty")
    elif isinstance(provider, dict) and not provider.get("name"):
        report.error((*path, "provider", "name"), "`provider.name` must not be empty")
    for i, rule in _items(rules):
        for j, frm in _items(rule.get("from")):
            source = frm.get("source")
            if not isinstance(source, dict):
                continue
            for name in _CUSTOM_SOURCE_FIELDS:
                if source.get(name):
                    report.error((*path, "rules", i, "from", j, "source", name),
                                 f"`{name}` is currently not supported with CUSTOM action")
        for k, cond in _items(rule.get("when")):
            key = cond.get("key")
            if isinstance(key, str) and (key in _CUSTOM_KEYS or key.startswith("request.auth.")):
                report.error((*path, "rules", i, "when", k, "key"),
                             f"{key} is currently not supported with CUSTOM action")


def _warn_deny_http_only(rules: Any, path: Path, report: Report) -> None:
    """A DENY rule on HTTP-only attributes cannot match TCP traffic, so Istio denies all of it."""
    for i, rule in _items(rules):
        sources = [f["source"] for _, f in _items(rule.get("from")) if isinstance(f.get("source"), dict)]
        operations = [t["operation"] for _, t in _items(rule.get("to"))
                      if isinstance(t.get("operation"), dict)]
        tcp_from = any(s.get(f) for s in sources for f in _TCP_SOURCE_FIELDS)
        tcp_to = any(o.get("ports") or o.get("notPorts") for o in operations)
        if (sources and not operations and not tcp_from) or (operations and not tcp_to):
            report.warning((*path, "rules", i), _DENY_HTTP_ONLY)


def _check_authorization_policy(spec: dict[str, Any], path: Path, report: Report) -> None:
    action = spec.get("action") or "ALLOW"
    if action == "CUSTOM":
        _check_custom(spec, path, report)
    elif spec.get("provider") is not None and action in ACTIONS:
        report.error((*path, "provider"),
                     f"`provider` must not be set with non CUSTOM action, found {action}")
    if action == "DENY":
        if not spec.get("rules"):
            report.error((*path, "action"), _never_triggered("DENY"))
        _warn_deny_http_only(spec.get("rules"), path, report)


_values = List(Str(allow_empty=False))
_ip_blocks = List(Str(allow_empty=False, checks=(check_cidr,)))
_service_accounts = List(Str(allow_empty=False, checks=(_check_service_account,)), checks=(_at_most(16),))
_trust_domains = List(Str(allow_empty=False, checks=(_check_trust_domain,)))
_ports = List(Str(allow_empty=False, checks=(_check_port_string,)))
_paths = List(Str(allow_empty=False, checks=(_check_path_template,)))

_source_fields: dict[str, Type] = {
    "principals": _values, "notPrincipals": _values,
    "requestPrincipals": _values, "notRequestPrincipals": _values,
    "namespaces": _values, "notNamespaces": _values,
    "serviceAccounts": _service_accounts, "notServiceAccounts": _service_accounts,
    "ipBlocks": _ip_blocks, "notIpBlocks": _ip_blocks,
    "remoteIpBlocks": _ip_blocks, "notRemoteIpBlocks": _ip_blocks,
    "trustDomains": _trust_domains, "notTrustDomains": _trust_domains,
}
_operation_fields: dict[str, Type] = {
    "hosts": _values, "notHosts": _values, "ports": _ports, "notPorts": _ports,
    "methods": _values, "notMethods": _values, "paths": _paths, "notPaths": _paths,
}
_SOURCE_FIELDS = tuple(_source_fields)
_OPERATION_FIELDS = tuple(_operation_fields)

_rule = Obj({
    "from": List(Obj({"source": Obj(_source_fields, checks=(_check_source,))},
                     checks=(_needs("source", "`from.source` must be set"),)),
                 checks=(_non_empty("`from` must not be empty"), _at_most(512))),
    "to": List(Obj({"operation": Obj(_operation_fields, checks=(_check_operation,))},
                   checks=(_needs("operation", "`to.operation` must be set"),)),
               checks=(_non_empty("`to` must not be empty"),)),
    "when": List(Obj({"key": Str(checks=(_check_condition_key,)), "values": _values, "notValues": _values},
                     required=("key",), checks=(_check_condition,))),
})

# --- RequestAuthentication ------------------------------------------------------------------------


def _check_jwks_uri(uri: str, path: Path, report: Report) -> None:
    """Istiod (or Envoy) fetches the key set from here, over HTTP(S) only."""
    try:
        parts = urlsplit(uri)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError when malformed
    except ValueError as exc:
        report.error(path, f"invalid jwksUri {uri!r}: {exc}")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        report.error(path, f"invalid jwksUri {uri!r}: url must have scheme http:// or https:// and a host")
    elif len(uri) > 2048:
        report.error(path, "jwksUri cannot exceed 2048 characters")


_JWK_TYPES = ("RSA", "EC", "OKP", "oct")


def _check_jwks(text: str, path: Path, report: Report) -> None:
    """Inline JWKS: a JWK Set or a single JWK. Envoy needs only public keys, so warn on private ones."""
    if not text:
        return  # Istio treats an empty jwks as unset
    try:
        doc = json.loads(text)
    except ValueError as exc:
        report.error(path, f"jwks parse error: {exc}")
        return
    keys = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not (isinstance(keys, list) and all(isinstance(k, dict) and k.get("kty") in _JWK_TYPES for k in keys)):
        report.error(path, "jwks parse error: expected a JWK Set {\"keys\": [...]} or a single JWK "
                           f"with kty one of {', '.join(_JWK_TYPES)}")
        return
    for i, key in enumerate(keys):
        if "d" in key or key["kty"] == "oct":
            report.warning(path, f"jwks key at index {i} contains private key material; "
                                 "only public keys are used for verification")


def _check_header_name(value: str, path: Path, report: Report) -> None:
    if value and not re.fullmatch(r"[-_A-Za-z0-9]+", value):  # empty: a missing required field
        report.error(path, f"header name {value!r} may contain only letters, digits, '-' and '_'")


def _check_jwt_rule(rule: dict[str, Any], path: Path, report: Report) -> None:
    key_sources = [f for f in rule if f in ("jwksUri", "jwks_uri", "jwks") and rule[f] is not None]
    if len(key_sources) > 1:
        report.error((*path, key_sources[1]), "only one of jwks or jwksUri can be set")
    if rule.get("issuer") is None and not (rule.get("jwksUri") or rule.get("jwks_uri")):
        report.error((*path, "issuer"), "issuer or jwksUri must be non-empty string")


_jwks_uri = Str(allow_empty=False, checks=(_check_jwks_uri,))
_jwt_rule = Obj({
    "issuer": Str(allow_empty=False),
    "audiences": _values,
    "jwksUri": _jwks_uri,
    "jwks_uri": _jwks_uri,  # the CRD's alternative (proto) name
    "jwks": Str(checks=(_check_jwks,)),
    "fromHeaders": List(Obj({"name": Str(), "prefix": Str()}, required=("name",))),
    "fromParams": _values,
    "fromCookies": _values,
    "outputPayloadToHeader": Str(),
    "forwardOriginalToken": Bool(),
    "outputClaimToHeaders": List(Obj({"header": Str(checks=(_check_header_name,)), "claim": Str()},
                                     required=("header", "claim"))),
    "timeout": Duration(),
    "spaceDelimitedClaims": List(Str(allow_empty=False), checks=(_at_most(64),)),
    "presence": Str(enum=("OPTIONAL", "REQUIRED")),
}, checks=(_check_jwt_rule,))

SCHEMAS: dict[str, Type] = {
    "PeerAuthentication": Obj({
        "selector": _selector,
        "mtls": _mtls,
        "portLevelMtls": Map(_mtls, key=AnyValue(checks=(_check_port_key,))),
    }, checks=(_check_peer_authentication,)),
    "AuthorizationPolicy": Obj({
        "selector": _selector,
        "targetRef": _target_ref,
        "targetRefs": _target_refs,
        "rules": List(_rule, checks=(_at_most(512),)),
        "action": Str(enum=ACTIONS),
        "provider": Obj({"name": Str()}),
    }, checks=(_check_one_target, _check_authorization_policy)),
    "RequestAuthentication": Obj({
        "selector": _selector,
        "targetRef": _target_ref,
        "targetRefs": _target_refs,
        "jwtRules": List(_jwt_rule, checks=(_at_most(4096),)),
    }, checks=(_check_one_target,)),
}
