"""networking.istio.io: VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Gateway, Sidecar.

Fields follow istio/api networking v1alpha3 (v1beta1 and v1 share them). Semantic checks
follow istio/istio pkg/config/validation and keep its wording where it has one, so a
message can be searched for; each error is pinned to the field it is about.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

from controlplane.config.schema import (
    Bool,
    Check,
    Int,
    List,
    Map,
    Num,
    Obj,
    Report,
    Str,
    Type,
)
from controlplane.config.validators import (
    Duration,
    Labels,
    Port,
    check_cidr,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_duration,
    check_host,
    check_ip,
    check_regex,
    parse_duration,
)
from controlplane.config.yamlload import Path

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
UNIX_PREFIX = "unix://"

PROTOCOLS = ("HTTP", "HTTP2", "HTTPS", "HTTP_PROXY", "GRPC", "GRPC-WEB", "TCP", "TLS", "UDP", "MONGO",
             "REDIS", "MYSQL")
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-WEB")
TLS_PROTOCOLS = ("HTTPS", "TLS")
RETRY_ON_POLICIES = frozenset((
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "envoy-ratelimited",
    "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
    "unavailable",
))
GRPC_STATUSES = frozenset((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
))
CORS_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "*"))
TOPOLOGY_LABELS = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone",
                   "topology.istio.io/subzone")
PSEUDO_HEADERS = frozenset((":method", ":scheme", ":authority", ":path", ":status"))
JWT_CLAIM_PREFIX = "@request.auth.claims"
HTTP_STATUS_CODES = frozenset(status.value for status in HTTPStatus)
MESH_GATEWAY = "mesh"
MAGLEV_TABLE_LIMIT = 5000011

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~A-Za-z0-9]+")
_HEADER_VALUE_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")


# ---- reading raw values: checks see the document as written, so wrong types read as unset


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _strs(value: Any) -> list[tuple[int, str]]:
    """The string items of a list, with their indexes (for paths)."""
    return [(i, v) for i, v in enumerate(_list(value)) if isinstance(v, str)]


def _dicts(value: Any) -> list[tuple[int, dict]]:
    return [(i, v) for i, v in enumerate(_list(value)) if isinstance(v, dict)]


def _is_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_fqdn(value: str) -> bool:
    """Istio's ValidateFQDN: DNS-1123 labels, a trailing dot allowed, no all-numeric top-level domain."""
    if not value or len(value) > 255:
        return False
    labels = value.removesuffix(".").split(".")
    return not _DIGITS.fullmatch(labels[-1]) and all(_is_label(label) for label in labels)


def _protocol(value: Any) -> str:
    """Istio parses protocols case-insensitively; '' (sniffed) and unknown names are neither."""
    name = _str(value).upper()
    return name if name in PROTOCOLS else ""


def _covers(wildcard: str, host: str) -> bool:
    return wildcard.startswith("*") and host.endswith(wildcard[1:])


def _hosts_overlap(a: str, b: str) -> bool:
    return a == b or _covers(a, b) or _covers(b, a)


def _host_subset(host: str, of: str) -> bool:
    """True when every name `host` matches is also matched by `of` (Istio's host.Name.SubsetOf)."""
    if of.startswith("*"):
        return host.removeprefix("*").endswith(of[1:])
    return host == of


# ---- scalar types


@dataclass
class _UInt64(Type):
    """A uint64 field: proto3 JSON writes 64-bit integers as strings, so "1024" is as good as 1024."""

    lo: int = 0
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        number = _uint64(value)
        if number is None:
            report.error(path, f"expected an integer or a decimal string, got {value!r}")
            return False
        if not self.lo <= number <= UINT64_MAX:
            report.error(path, f"{number} is out of range [{self.lo}, {UINT64_MAX}]")
            return False
        return True


def _uint64(value: Any) -> int | None:
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_ms_duration(value: Any, path: Path, report: Report) -> None:
    """Istio's ValidateDuration: at least 1ms, in whole milliseconds (Envoy's precision)."""
    seconds = parse_duration(value)
    if seconds is None or seconds < 0.001:
        check_duration(value, path, report)
    elif round(seconds * 1e9) % 1_000_000:
        report.error(path, "only durations to ms precision are supported")


def _check_idle_timeout(value: Any, path: Path, report: Report) -> None:
    """A TCP idle timeout of 0s disables it; any other value is an ordinary duration."""
    if parse_duration(value) != 0:
        _check_ms_duration(value, path, report)


def _check_max_age(value: Any, path: Path, report: Report) -> None:
    """CORS max-age is sent in whole seconds; Istio refuses what would be truncated."""
    seconds = parse_duration(value)
    if seconds is not None and seconds >= 0.001 and round(seconds * 1e9) % 1_000_000_000:
        report.error(path, "max_age duration is accurate only to seconds precision")
    else:
        _check_ms_duration(value, path, report)


DURATION = Str(checks=(_check_ms_duration,))
ANY_DURATION = Duration(minimum=0)  # fields whose 0 means something (session cookies, budgets)
UINT32 = Int(0, UINT32_MAX)
NON_NEGATIVE_INT32 = Int(0, INT32_MAX)
PERCENT = Obj({"value": Num(0, 100)})


def _check_port_name(value: str, path: Path, report: Report) -> None:
    if not _is_label(value):
        report.error(path, f"invalid port name: {value}")


def _check_protocol(value: str, path: Path, report: Report) -> None:
    if value and not _protocol(value):
        report.error(path, f"unsupported protocol: {value}")


def _check_subset_name(value: str, path: Path, report: Report) -> None:
    if not _is_label(value):
        report.error(path, f"subset name is invalid: {value!r}")


def _check_unix_address(address: str, path: Path, report: Report) -> None:
    """`unix://` endpoints name an absolute socket path or an abstract socket (`@name`)."""
    socket = address.removeprefix(UNIX_PREFIX)
    if not socket:
        report.error(path, "unix address must not be empty")
    elif not socket.startswith("@") and (not socket.startswith("/") or socket.endswith("/")):
        report.error(path, f"{socket} is not an absolute path to a file")


def _check_bind(value: str, path: Path, report: Report) -> None:
    if value.startswith(UNIX_PREFIX):
        _check_unix_address(value, path, report)
    else:
        check_ip(value, path, report)


def _check_source_namespace(value: str, path: Path, report: Report) -> None:
    if value and not _is_label(value):
        report.error(path, f"sourceNamespace match {value} is invalid")


def _check_gateway_ref(value: str, path: Path, report: Report) -> None:
    """`mesh`, a gateway in the VirtualService's namespace, or `namespace/name`."""
    namespace, slash, name = value.partition("/")
    if not slash:
        check_host(value, path, report, allow_wildcard=False)
        if "." in value:
            parts = value.split(".")
            report.warning(path, f"using legacy gatewayName format {value!r}; prefer the <namespace>/<name> "
                                 f"format: {parts[1] + '/' + parts[0]!r}")
    elif not namespace or not name:
        report.error(path, "config namespace and gateway name cannot be empty")
    elif not _is_label(namespace):
        report.error(path, f"invalid value for namespace: {namespace!r}")
    elif not _is_label(name):
        report.error(path, f"invalid value for gateway name: {name!r}")


def _check_namespaced_host(value: str, path: Path, report: Report, gateway: bool) -> None:
    """Gateway server and Sidecar egress hosts: `namespace/dnsName` (gateways also take a bare name)."""
    namespace, slash, host = value.partition("/")
    if not slash:
        if not gateway:
            report.error(path, "host must be of form namespace/dnsName")
            return
        host = value
    elif not namespace or not host:
        report.error(path, "config namespace and dnsName in host entry cannot be empty")
        return
    elif gateway and namespace not in ("*", ".") and not _is_label(namespace):
        report.error(path, f"invalid namespace value {namespace!r} in gateway")
        return
    elif not gateway and namespace.removeprefix("~") not in ("", "*", ".") \
            and not _is_label(namespace.removeprefix("~")):
        report.error(path, f"invalid namespace value {namespace!r} in sidecar")
        return
    if host != "*" and "." not in host:
        report.error(path, f"short names (non FQDN) are not allowed: {host!r}")
    elif host.startswith("*") and host != "*" and not host.startswith("*."):
        report.error(path, f"partial wildcard {host!r} not allowed")
    elif not (gateway and _is_ip(host)):
        check_host(host, path, report)


# ---- shared messages: destinations, string matches, headers


def _check_destination_host(value: str, path: Path, report: Report) -> None:
    if value == "*":
        report.error(path, f"invalid destination host {value}")
    else:
        check_host(value, path, report)


PORT_SELECTOR = Obj({"number": Port()}, required=("number",))
DESTINATION = Obj({
    "host": Str(checks=(_check_destination_host,)),
    "subset": Str(checks=(_check_subset_name,)),
    "port": PORT_SELECTOR,
}, required=("host",))


def _check_string_match(match: dict, path: Path, report: Report, *, presence_ok: bool,
                        empty_prefix_ok: bool, empty_exact_ok: bool, star_regex_ok: bool) -> None:
    present = [k for k in ("exact", "prefix", "regex") if match.get(k) is not None]
    if len(present) > 1 or (not present and not presence_ok):
        report.error(path, "exactly one of exact, prefix, regex must be set")
        return
    if match.get("prefix") == "" and not empty_prefix_ok:
        report.error((*path, "prefix"), "prefix string match should not be empty")
    if match.get("exact") == "" and not empty_exact_ok:
        report.error((*path, "exact"), "exact string match should not be empty")
    regex = match.get("regex")
    if not isinstance(regex, str) or (star_regex_ok and regex == "*"):
        return
    if not regex:
        report.error((*path, "regex"), "regex string match should not be empty")
    elif len(regex) > 1024:
        report.error((*path, "regex"), "regex is too large, max length allowed is 1024")
    else:
        check_regex(regex, (*path, "regex"), report)


def _string_match(*, presence_ok: bool = False, empty_prefix_ok: bool = False, empty_exact_ok: bool = True,
                  star_regex_ok: bool = False) -> Obj:
    """StringMatch: exactly one of exact/prefix/regex (header matches may be `{}`: presence only)."""
    check = partial(_check_string_match, presence_ok=presence_ok, empty_prefix_ok=empty_prefix_ok,
                    empty_exact_ok=empty_exact_ok, star_regex_ok=star_regex_ok)
    return Obj({"exact": Str(), "prefix": Str(), "regex": Str()}, checks=(check,))


def _check_match_header_name(value: str, path: Path, report: Report) -> None:
    if not value:
        report.error(path, "header name cannot be empty")
    elif not (value.startswith(JWT_CLAIM_PREFIX) or value in PSEUDO_HEADERS or _HEADER_NAME.fullmatch(value)):
        report.error(path, f"header name {value} is not a valid header name")


def _check_header_to_add(value: str, path: Path, report: Report) -> None:
    """Request headers may be set or added, but not pseudo-headers other than :authority."""
    if not value:
        report.error(path, "header name cannot be empty")
    elif value.startswith(":") and value.lower() != ":authority":
        report.error(path, f"invalid header {value!r}: header cannot have \":\" prefix")


def _check_header_to_change(value: str, path: Path, report: Report) -> None:
    """Response headers and removals: neither Host nor pseudo-headers can be touched."""
    if not value:
        report.error(path, "header name cannot be empty")
    elif value.lower() == "host":
        report.error(path, f"invalid header {value!r}: cannot set Host header")
    elif value.startswith(":"):
        report.error(path, f"invalid header {value!r}: header cannot have \":\" prefix")


def _check_header_value(value: str, path: Path, report: Report) -> None:
    if _HEADER_VALUE_BAD.search(value):
        report.error(path, f"header value configuration {value!r} is invalid")


def _header_operations(name_check: Check, remove_check: Check) -> Obj:
    value = Str(checks=(_check_header_value,))
    return Obj({
        "set": Map(value, key=Str(checks=(name_check,))),
        "add": Map(value, key=Str(checks=(name_check,))),
        "remove": List(Str(checks=(remove_check,))),
    })


HEADERS = Obj({
    "request": _header_operations(_check_header_to_add, _check_header_to_change),
    "response": _header_operations(_check_header_to_change, _check_header_to_change),
})


# ---- DestinationRule: traffic policies


def _check_tls_mode_fields(tls: dict, path: Path, report: Report, mode: str,
                           fields: tuple[tuple[str, str], ...]) -> None:
    for field, what in fields:
        if tls.get(field):
            report.error((*path, field), f"{mode} TLS cannot have associated {what}")


def _check_client_tls(tls: dict, path: Path, report: Report) -> None:
    """Upstream TLS: ISTIO_MUTUAL brings its own certificates; MUTUAL needs a client certificate."""
    mode = _str(tls.get("mode")) or "DISABLE"
    credential = _str(tls.get("credentialName"))
    if mode == "ISTIO_MUTUAL":
        _check_tls_mode_fields(tls, path, report, mode, (
            ("clientCertificate", "client certificate"), ("privateKey", "private key"),
            ("caCertificates", "CA certificates"), ("credentialName", "credentialName")))
        return
    if tls.get("insecureSkipVerify") is True:
        if mode == "SIMPLE" and (tls.get("caCertificates") or credential or tls.get("subjectAltNames")):
            report.error((*path, "insecureSkipVerify"), "cannot specify CaCertificates or CredentialName or "
                                                        "SubjectAltNames when InsecureSkipVerify is set true")
        if mode == "MUTUAL" and (tls.get("caCertificates") or tls.get("subjectAltNames")):
            report.error((*path, "insecureSkipVerify"), "cannot specify CaCertificates or SubjectAltNames "
                                                        "when InsecureSkipVerify is set true")
    if mode in ("SIMPLE", "MUTUAL") and credential:
        if any(tls.get(f) for f in ("clientCertificate", "caCertificates", "privateKey", "caCrl")):
            report.error((*path, "credentialName"), "cannot specify client certificates or CA certificate "
                                                    "or CA CRL If credentialName is set")
        return
    if mode == "MUTUAL":
        if not tls.get("clientCertificate"):
            report.error((*path, "clientCertificate"), "client certificate required for mutual tls")
        if not tls.get("privateKey"):
            report.error((*path, "privateKey"), "private key required for mutual tls")


CLIENT_TLS = Obj({
    "mode": Str(enum=("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
    "clientCertificate": Str(),
    "privateKey": Str(),
    "caCertificates": Str(),
    "credentialName": Str(),
    "subjectAltNames": List(Str()),
    "sni": Str(),
    "insecureSkipVerify": Bool(),
    "caCrl": Str(),
}, checks=(_check_client_tls,))


def _check_http_pool(http: dict, path: Path, report: Report) -> None:
    if http.get("h2UpgradePolicy") == "UPGRADE" and http.get("useClientProtocol") is True:
        report.error((*path, "useClientProtocol"),
                     "use client protocol must not be true when H2UpgradePolicy is UPGRADE")


def _check_connection_pool(pool: dict, path: Path, report: Report) -> None:
    if pool.get("tcp") is None and pool.get("http") is None:
        report.error(path, "connection pool must have at least one field")


CONNECTION_POOL = Obj({
    "tcp": Obj({
        "maxConnections": NON_NEGATIVE_INT32,
        "connectTimeout": DURATION,
        "tcpKeepalive": Obj({"probes": UINT32, "time": DURATION, "interval": DURATION}),
        "maxConnectionDuration": DURATION,
        "idleTimeout": Str(checks=(_check_idle_timeout,)),
    }),
    "http": Obj({
        "http1MaxPendingRequests": NON_NEGATIVE_INT32,
        "http2MaxRequests": NON_NEGATIVE_INT32,
        "maxRequestsPerConnection": NON_NEGATIVE_INT32,
        "maxRetries": NON_NEGATIVE_INT32,
        "idleTimeout": DURATION,
        "h2UpgradePolicy": Str(enum=("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
        "useClientProtocol": Bool(),
        "maxConcurrentStreams": NON_NEGATIVE_INT32,
        "http2KeepAlive": Obj({"interval": DURATION, "timeout": DURATION}, required=("interval", "timeout")),
    }, checks=(_check_http_pool,)),
}, checks=(_check_connection_pool,))


def _check_outlier_detection(outlier: dict, path: Path, report: Report) -> None:
    if outlier.get("consecutiveErrors") is not None:
        report.warning((*path, "consecutiveErrors"),
                       "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or "
                       "consecutive5xxErrors instead")
    if _int(outlier.get("consecutiveLocalOriginFailures")) > 0 \
            and outlier.get("splitExternalLocalOriginErrors") is not True:
        report.error((*path, "consecutiveLocalOriginFailures"),
                     "outlier detection consecutive local origin failures is specified, but split external "
                     "local origin errors is set to false")


OUTLIER_DETECTION = Obj({
    "consecutiveErrors": NON_NEGATIVE_INT32,
    "splitExternalLocalOriginErrors": Bool(),
    "consecutiveLocalOriginFailures": UINT32,
    "consecutiveGatewayErrors": UINT32,
    "consecutive5xxErrors": UINT32,
    "interval": DURATION,
    "baseEjectionTime": DURATION,
    "maxEjectionPercent": Int(0, 100),
    "minHealthPercent": Int(0, 100),
    "outlierDetectionHttpErrorCodes": List(Int(100, 599)),
}, checks=(_check_outlier_detection,))


def _is_prime(n: int) -> bool:
    return n == 2 or (n > 2 and n % 2 == 1 and all(n % f for f in range(3, int(n ** 0.5) + 1, 2)))


def _check_maglev(maglev: dict, path: Path, report: Report) -> None:
    """Envoy needs a prime Maglev table below 5000011 entries."""
    size = _uint64(maglev.get("tableSize")) or 0
    where = (*path, "tableSize")
    if not size:
        report.error(where, "tableSize must be set for maglev")
    elif size >= MAGLEV_TABLE_LIMIT:
        report.error(where, f"tableSize must be less than {MAGLEV_TABLE_LIMIT} for maglev")
    elif not _is_prime(size):
        report.error(where, "tableSize must be a prime number for maglev")


def _unique_names(what: str) -> Check:
    """A check that the `name` of every item in a list is unique."""

    def check(items: list, path: Path, report: Report) -> None:
        seen: set[str] = set()
        for i, item in _dicts(items):
            name = item.get("name")
            if isinstance(name, str) and name in seen:
                report.error((*path, i, "name"), f"{what}: {name}")
            elif isinstance(name, str):
                seen.add(name)

    return check


_check_cookie_attributes = _unique_names("duplicate cookie attribute name")


def _check_consistent_hash(hash_lb: dict, path: Path, report: Report) -> None:
    if hash_lb.get("minimumRingSize") is None:
        return
    if hash_lb.get("ringHash") is not None or hash_lb.get("maglev") is not None:
        report.error((*path, "minimumRingSize"),
                     "only one of MinimumRingSize or Maglev/Ringhash can be specified")
    else:
        report.warning((*path, "minimumRingSize"), "consistent hash MinimumRingSize is deprecated, use "
                                                   "ConsistentHashLB's RingHash configuration instead")


CONSISTENT_HASH = Obj({
    "httpHeaderName": Str(),
    "httpCookie": Obj({
        "name": Str(),
        "path": Str(),
        "ttl": ANY_DURATION,
        "attributes": List(Obj({"name": Str(), "value": Str()}, required=("name",)),
                           checks=(_check_cookie_attributes,)),
    }, required=("name",)),
    "useSourceIp": Bool(),
    "httpQueryParameterName": Str(),
    "ringHash": Obj({"minimumRingSize": _UInt64()}),
    "maglev": Obj({"tableSize": _UInt64()}, checks=(_check_maglev,)),
    "minimumRingSize": _UInt64(),
}, one_of=(("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"), ("ringHash", "maglev")),
    checks=(_check_consistent_hash,))


def _locality_overlaps(a: list[str], b: list[str]) -> bool:
    return all(x == y or "*" in (x, y) for x, y in zip(a, b, strict=False))


def _check_localities(localities: list[tuple[str, Path]], report: Report) -> None:
    """`region[/zone[/subzone]]`, '*' only last; no two may select the same endpoints."""
    seen: list[list[str]] = []
    for locality, path in localities:
        stars = locality.count("*")
        if stars and (stars > 1 or not locality.endswith("*")):
            report.error(path, f"locality {locality} wildcard '*' number can not exceed 1 and must be in the "
                               "end")
            continue
        parts = locality.split("/", 2)
        if "" in parts:
            report.error(path, f"locality {locality} must not contain empty region/zone/subzone info")
        elif any(_locality_overlaps(parts, other) for other in seen):
            report.error(path, f"locality {locality} overlap with previous specified ones")
        else:
            seen.append(parts)


def _check_failover(failover: list, path: Path, report: Report, what: str) -> None:
    for i, rule in _dicts(failover):
        source, target = _str(rule.get("from")), _str(rule.get("to"))
        where = (*path, "failover", i)
        if source == target:
            report.error(where, f"{what} failover settings must specify different regions")
        if "/" in source or "/" in target:
            report.error(where, f"{what} failover only specify region")
        if "*" in source or "*" in target:
            report.error(where, f"{what} failover region should not contain '*' wildcard")


def _check_locality_lb(lb: dict, path: Path, report: Report) -> None:
    distribute, failover = _list(lb.get("distribute")), _list(lb.get("failover"))
    if distribute and failover:
        report.error(path, "can not simultaneously specify 'distribute' and 'failover'")
        return
    if failover:
        for i, label in _strs(lb.get("failoverPriority")):
            if label in TOPOLOGY_LABELS:
                report.error((*path, "failoverPriority", i),
                             f"can not simultaneously set 'failover' and topology label '{label}' in "
                             "'failover_priority'")
    sources: list[tuple[str, Path]] = []
    for i, rule in _dicts(distribute):
        where = (*path, "distribute", i)
        if isinstance(rule.get("from"), str):
            sources.append((rule["from"], (*where, "from")))
        targets = {k: w for k, w in _dict(rule.get("to")).items() if isinstance(k, str) and _int(w) == w}
        bad = [k for k, w in targets.items() if not 1 <= w <= 100]
        for k in bad:
            report.error((*where, "to", k), "locality weight must be in range [1, 100]")
        if targets and not bad and sum(targets.values()) != 100:
            report.error((*where, "to"), f"total locality weight {sum(targets.values())} != 100")
        _check_localities([(k, (*where, "to", k)) for k in targets], report)
    _check_localities(sources, report)
    _check_failover(failover, path, report, "locality lb")


def _check_zone_aware_lb(lb: dict, path: Path, report: Report) -> None:
    for i, label in _strs(lb.get("failoverPriority")):
        if label in TOPOLOGY_LABELS:
            report.error((*path, "failoverPriority", i),
                         f"'failover_priority' for zone aware lb must not use topology label '{label}'; "
                         "region- and zone-level routing are handled automatically")
    _check_failover(_list(lb.get("failover")), path, report, "zone aware lb")


def _check_aggression(value: float, path: Path, report: Report) -> None:
    if value <= 0:
        report.error(path, "aggression should be greater than 0")


FAILOVER = Obj({"from": Str(), "to": Str()})
LOAD_BALANCER = Obj({
    "simple": Str(enum=("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN",
                        "LEAST_REQUEST")),
    "consistentHash": CONSISTENT_HASH,
    "localityLbSetting": Obj({
        "distribute": List(Obj({"from": Str(), "to": Map(UINT32)})),
        "failover": List(FAILOVER),
        "failoverPriority": List(Str()),
        "enabled": Bool(),
    }, checks=(_check_locality_lb,)),
    "zoneAwareLbSetting": Obj({
        "enabled": Bool(),
        "failover": List(FAILOVER),
        "failoverPriority": List(Str()),
        "minClusterSize": _UInt64(lo=1),
    }, checks=(_check_zone_aware_lb,)),
    "warmupDurationSecs": DURATION,
    "warmup": Obj({
        "duration": DURATION,
        "minimumPercent": Num(0, 100),
        "aggression": Num(checks=(_check_aggression,)),
    }, required=("duration",)),
}, one_of=(("simple", "consistentHash"), ("localityLbSetting", "zoneAwareLbSetting"),
           ("warmupDurationSecs", "warmup")))


def _check_tunnel_protocol(value: str, path: Path, report: Report) -> None:
    if value not in ("", "CONNECT", "POST"):
        report.error(path, 'tunnel protocol must be "CONNECT" or "POST"')


def _warn_failover_without_outlier(policy: dict, path: Path, report: Report) -> None:
    """Failover only happens when outlier detection marks the local endpoints unhealthy."""
    if policy.get("outlierDetection") is not None:
        return
    for setting in ("localityLbSetting", "zoneAwareLbSetting"):
        lb = _dict(_dict(policy.get("loadBalancer")).get(setting))
        if lb.get("failover") or lb.get("failoverPriority"):
            report.warning((*path, "loadBalancer", setting),
                           "outlier detection policy must be provided for failover")


PORT_POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
POLICY_FIELDS = (*PORT_POLICY_FIELDS, "portLevelSettings", "tunnel", "proxyProtocol", "retryBudget")


def _check_port_policy(policy: dict, path: Path, report: Report) -> None:
    if all(policy.get(f) is None for f in PORT_POLICY_FIELDS):
        report.error(path, "port traffic policy must have at least one field")
    _warn_failover_without_outlier(policy, path, report)


def _check_traffic_policy(policy: dict, path: Path, report: Report) -> None:
    if all(policy.get(f) is None for f in POLICY_FIELDS):
        report.error(path, "traffic policy must have at least one field")
    if policy.get("tunnel") is not None and policy.get("proxyProtocol") is not None:
        report.error((*path, "proxyProtocol"), "tunnel and proxyProtocol must not be set together")
    _warn_failover_without_outlier(policy, path, report)


TRAFFIC_POLICY = Obj({
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "tls": CLIENT_TLS,
    "portLevelSettings": List(Obj({
        "port": PORT_SELECTOR,
        "loadBalancer": LOAD_BALANCER,
        "connectionPool": CONNECTION_POOL,
        "outlierDetection": OUTLIER_DETECTION,
        "tls": CLIENT_TLS,
    }, required=("port",), checks=(_check_port_policy,))),
    "tunnel": Obj({
        "protocol": Str(checks=(_check_tunnel_protocol,)),
        "targetHost": Str(checks=(partial(check_host, allow_wildcard=False),)),
        "targetPort": Port(),
    }, required=("targetHost", "targetPort")),
    "proxyProtocol": Obj({"version": Str(enum=("V1", "V2"))}),
    "retryBudget": Obj({"percent": Num(0, 100), "minRetryConcurrency": UINT32,
                        "budgetInterval": ANY_DURATION}),
}, checks=(_check_traffic_policy,))


def _check_export_to_entry(value: str, path: Path, report: Report, service_entry: bool) -> None:
    if value in (".", "*") or (value == "~" and service_entry):
        return
    if value == "~":
        report.error(path, "exportTo ~ (none) is not allowed for Istio configuration objects")
    elif not _is_label(value):
        report.error(path, "only .,*, or a valid DNS 1123 label is allowed as exportTo entry")


def _check_export_to(entries: list, path: Path, report: Report, service_entry: bool) -> None:
    namespace = report.context.get("namespace", "")
    seen: set[str] = set()
    for i, entry in _strs(entries):
        key = namespace if entry == "." else entry
        if key in seen:
            report.error((*path, i), f"duplicate entries in exportTo: . and current namespace {namespace}"
                         if key != entry else f"duplicate entries in exportTo for entry {entry}")
        seen.add(key)
    if "*" in seen and len(entries) > 1:
        report.error(path, "cannot have both public (*) and non-public exportTo values for a resource")
    if service_entry and "~" in seen and len(entries) > 1:
        report.error(path, "cannot export service entry to no one (~) and someone")


def _export_to(service_entry: bool = False) -> List:
    return List(Str(checks=(partial(_check_export_to_entry, service_entry=service_entry),)),
                checks=(partial(_check_export_to, service_entry=service_entry),))


_check_subsets = _unique_names("duplicate subset names")


def _check_destination_rule(rule: dict, path: Path, report: Report) -> None:
    """A DestinationRule with a workload selector applies to its own namespace only."""
    if rule.get("workloadSelector") is None:
        return
    namespace = report.context.get("namespace", "")
    exports = {namespace if e == "." else e for _, e in _strs(rule.get("exportTo"))}
    if exports and namespace not in exports:
        report.error((*path, "exportTo"),
                     "destination rule with workload selector cannot have exportTo beyond current namespace")
    elif len(exports) > 1:
        report.error((*path, "exportTo"),
                     "destination rule with workload selector cannot have multiple entries in exportTo")


DESTINATION_RULE = Obj({
    "host": Str(checks=(check_host,)),
    "trafficPolicy": TRAFFIC_POLICY,
    "subsets": List(Obj({
        "name": Str(checks=(_check_subset_name,)),
        "labels": Labels(),
        "trafficPolicy": TRAFFIC_POLICY,
    }, required=("name",)), checks=(_check_subsets,)),
    "exportTo": _export_to(),
    "workloadSelector": Obj({"matchLabels": Labels()}),
}, required=("host",), checks=(_check_destination_rule,))


# ---- VirtualService


def _check_weights(destinations: list, path: Path, report: Report) -> None:
    """Traffic is split by weight: several destinations must share exactly 100."""
    weights = [d.get("weight", 0) for d in destinations if isinstance(d, dict)]
    if len(weights) != len(destinations) or any(_int(w) != w or not 0 <= w <= 100 for w in weights):
        return  # a malformed entry or weight is already reported
    if len(weights) == 1 and not weights[0]:
        return
    if sum(weights) != 100:
        where = (*path, 0, "weight") if len(weights) == 1 else path
        report.error(where, f"total destination weight = {sum(weights)} != 100")


def _check_http_status(value: int, path: Path, report: Report) -> None:
    if not 200 <= value <= 599:
        report.error(path, f"HTTP status {value} is not in range 200-599")


def _check_grpc_status(value: str, path: Path, report: Report) -> None:
    if value not in GRPC_STATUSES:
        report.error(path, f"gRPC status {value!r} is not supported. See "
                           "https://github.com/grpc/grpc/blob/master/doc/statuscodes.md for a list of "
                           "supported codes, for example 'NOT_FOUND'")


def _check_delay(delay: dict, path: Path, report: Report) -> None:
    if delay.get("exponentialDelay") is not None:
        report.error((*path, "exponentialDelay"), "exponentialDelay not supported yet")
    elif delay.get("fixedDelay") is None:
        report.error((*path, "fixedDelay"), "delay requires fixedDelay")


def _check_abort(abort: dict, path: Path, report: Report) -> None:
    if abort.get("http2Error") is not None:
        report.error((*path, "http2Error"), "HTTP/2 abort fault injection not supported yet")
    elif abort.get("httpStatus") is None and abort.get("grpcStatus") is None:
        report.warning(path, "abort configured, but error type not set")


def _check_fault(fault: dict, path: Path, report: Report) -> None:
    if fault.get("delay") is None and fault.get("abort") is None:
        report.error(path, "HTTP fault injection must have an abort and/or a delay")


FAULT = Obj({
    "delay": Obj({
        "percent": Int(0, 100),
        "fixedDelay": DURATION,
        "exponentialDelay": DURATION,
        "percentage": PERCENT,
    }, one_of=(("fixedDelay", "exponentialDelay"),), checks=(_check_delay,)),
    "abort": Obj({
        "httpStatus": Int(checks=(_check_http_status,)),
        "grpcStatus": Str(checks=(_check_grpc_status,)),
        "http2Error": Str(),
        "percentage": PERCENT,
    }, one_of=(("httpStatus", "grpcStatus", "http2Error"),), checks=(_check_abort,)),
}, checks=(_check_fault,))


def _check_retry_on(value: str, path: Path, report: Report) -> None:
    """A comma-separated list of Envoy retry policies and HTTP status codes."""
    for policy in value.split(","):
        status = int(policy) if _DIGITS.fullmatch(policy) else 0
        if policy not in RETRY_ON_POLICIES and status not in HTTP_STATUS_CODES:
            report.error(path, f"{policy!r} is not a valid retryOn policy")


def _check_retries(retries: dict, path: Path, report: Report) -> None:
    if not _int(retries.get("attempts")) and any(
            retries.get(f) not in (None, "") for f in ("perTryTimeout", "retryOn", "retryRemoteLocalities")):
        report.error((*path, "attempts"),
                     "http retry policy configured when attempts are set to 0 (disabled)")


RETRIES = Obj({
    "attempts": NON_NEGATIVE_INT32,
    "perTryTimeout": DURATION,
    "retryOn": Str(checks=(_check_retry_on,)),
    "retryRemoteLocalities": Bool(),
    "retryIgnorePreviousHosts": Bool(),
    "backoff": DURATION,
}, checks=(_check_retries,))


def _check_redirect(redirect: dict, path: Path, report: Report) -> None:
    if redirect.get("uri") and redirect.get("prefixRewrite"):
        report.error((*path, "prefixRewrite"), "redirect may only specify one of uri or prefix_rewrite")
    if not any(redirect.get(f) for f in ("uri", "prefixRewrite", "authority", "scheme", "port")) \
            and redirect.get("derivePort") is None:
        report.error(path, "redirect must specify URI, authority, scheme, or port")
    code = _int(redirect.get("redirectCode"))
    if code and not 300 <= code <= 399:
        report.error((*path, "redirectCode"), f"{code} is not a valid redirect code, must be 3xx")
    if redirect.get("scheme") not in (None, "", "http", "https"):
        report.error((*path, "scheme"), 'invalid redirect scheme, must be "http" or "https"')


def _check_body(body: dict, path: Path, report: Report) -> None:
    """Direct responses live in every proxy's route table: keep them small."""
    size = len(_str(body.get("string")).encode())
    if isinstance(body.get("bytes"), str):
        try:
            size = len(base64.b64decode(body["bytes"], validate=True))
        except binascii.Error:
            report.error((*path, "bytes"), "bytes must be base64-encoded")
    if size > 1024 * 1024:
        report.error(path, "large direct_responses may impact control plane performance, must be less than "
                           "1MB")
    elif size > 100 * 1024:
        report.warning(path, "large direct_responses may impact control plane performance")


def _check_regex_rewrite(rewrite: dict, path: Path, report: Report) -> None:
    if not rewrite.get("match") or not rewrite.get("rewrite"):
        report.error(path, "UriRegexRewrite requires both Rewrite and Match fields to be specified")
    elif isinstance(rewrite["match"], str):
        check_regex(rewrite["match"], (*path, "match"), report)


def _check_rewrite(rewrite: dict, path: Path, report: Report) -> None:
    if rewrite.get("uri") and rewrite.get("uriRegexRewrite") is not None:
        report.error((*path, "uriRegexRewrite"), "rewrite may only contain one of URI or UriRegexRewrite")
    elif not rewrite.get("uri") and rewrite.get("uriRegexRewrite") is None and not rewrite.get("authority"):
        report.error(path, "rewrite must specify at least one of URI, UriRegexRewrite, or authority")


def _check_cors_method(value: str, path: Path, report: Report) -> None:
    if value not in CORS_METHODS:
        report.error(path, f"{value!r} is not a supported HTTP method")


def _check_cors_header(value: str, path: Path, report: Report) -> None:
    if not value:
        report.error(path, "header name cannot be empty")
    elif value != "*" and not _HEADER_NAME.fullmatch(value):
        report.error(path, f"header name {value} is not a valid header name")


def _warn_mirror_percent(value: int, path: Path, report: Report) -> None:
    report.warning(path, 'using deprecated setting "mirrorPercent", use "mirrorPercentage" instead')


MIRROR_PERCENT = Int(0, 100, checks=(_warn_mirror_percent,))
CORS_POLICY = Obj({
    "allowOrigin": List(Str()),
    "allowOrigins": List(_string_match(empty_exact_ok=False)),
    "allowMethods": List(Str(checks=(_check_cors_method,))),
    "allowHeaders": List(Str(checks=(_check_cors_header,))),
    "exposeHeaders": List(Str(checks=(_check_cors_header,))),
    "maxAge": Str(checks=(_check_max_age,)),
    "allowCredentials": Bool(),
    "unmatchedPreflights": Str(enum=("UNSPECIFIED", "FORWARD", "IGNORE")),
})
HTTP_MATCH = Obj({
    "name": Str(),
    "uri": _string_match(empty_prefix_ok=True),
    "scheme": _string_match(),
    "method": _string_match(),
    "authority": _string_match(),
    "headers": Map(_string_match(presence_ok=True), key=Str(checks=(_check_match_header_name,))),
    "port": Port(),
    "sourceLabels": Labels(),
    "gateways": List(Str(checks=(_check_gateway_ref,))),
    "queryParams": Map(_string_match(presence_ok=True)),
    "ignoreUriCase": Bool(),
    "withoutHeaders": Map(_string_match(presence_ok=True, star_regex_ok=True),
                          key=Str(checks=(_check_match_header_name,))),
    "sourceNamespace": Str(checks=(_check_source_namespace,)),
    "statPrefix": Str(),
})
EXCLUSIVE_ACTIONS = {"redirect": ("route", "fault", "rewrite", "directResponse"),
                    "directResponse": ("route", "fault", "rewrite")}


def _authority_writes(route: dict) -> list[tuple[Path, str]]:
    writes = []
    if _str(_dict(route.get("rewrite")).get("authority")):
        writes.append((("rewrite", "authority"), route["rewrite"]["authority"]))
    request = _dict(_dict(route.get("headers")).get("request"))
    for op in ("set", "add"):
        for name, value in _dict(request.get(op)).items():
            if isinstance(name, str) and name.lower() in (":authority", "host"):
                writes.append((("headers", "request", op, name), _str(value)))
    return writes


def _check_http_route(route: dict, path: Path, report: Report) -> None:
    """What one HTTP rule may do: forward, redirect, respond directly or delegate, never two at once."""
    def present(field: str) -> bool:
        return bool(_list(route.get(field))) if field == "route" else route.get(field) is not None

    root = " ".join(("root HTTP route", _str(route.get("name")))).strip()
    if present("delegate"):
        for field in ("redirect", "route"):
            if present(field):
                report.error((*path, field), f"{root} must not specify {field}")
    else:
        action = next((a for a in EXCLUSIVE_ACTIONS if present(a)), None)
        if action is not None:
            for other in EXCLUSIVE_ACTIONS[action]:
                if present(other):
                    report.error((*path, other), f"HTTP route cannot contain both {other} and {action}")
        elif not present("route"):
            report.error(path, "HTTP route, redirect or direct_response is required")
    if present("mirror") and _list(route.get("mirrors")):
        report.error((*path, "mirrors"), "HTTP route cannot contain both mirror and mirrors")
    if _str(_dict(route.get("redirect")).get("prefixRewrite")):
        for i, match in _dicts(route.get("match")):
            uri = match.get("uri")
            if isinstance(uri, dict) and uri.get("prefix") is None:
                report.error((*path, "match", i, "uri"),
                             "redirect prefix_rewrite requires all URI matches to use prefix match type")
    writes = _authority_writes(route)
    for where, value in writes[1:]:
        report.error((*path, *where), "authority header cannot be set multiple times: "
                                      f"have {writes[0][1]!r}, attempting to set {value!r}")


HTTP_ROUTE = Obj({
    "name": Str(),
    "match": List(HTTP_MATCH),
    "route": List(Obj({"destination": DESTINATION, "weight": Int(0, 100), "headers": HEADERS},
                      required=("destination",)), checks=(_check_weights,)),
    "redirect": Obj({
        "uri": Str(),
        "authority": Str(),
        "port": Port(),
        "derivePort": Str(enum=("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
        "scheme": Str(),
        "redirectCode": UINT32,
        "prefixRewrite": Str(),
    }, one_of=(("port", "derivePort"),), checks=(_check_redirect,)),
    "directResponse": Obj({
        "status": Int(checks=(_check_http_status,)),
        "body": Obj({"string": Str(), "bytes": Str()}, one_of=(("string", "bytes"),), checks=(_check_body,)),
    }, required=("status",)),
    "delegate": Obj({"name": Str(checks=(check_dns1123_subdomain,)),
                     "namespace": Str(checks=(partial(check_dns1123_label, what="namespace"),))},
                    required=("name",)),
    "rewrite": Obj({
        "uri": Str(),
        "authority": Str(),
        "uriRegexRewrite": Obj({"match": Str(), "rewrite": Str()}, checks=(_check_regex_rewrite,)),
    }, checks=(_check_rewrite,)),
    "timeout": DURATION,
    "retries": RETRIES,
    "fault": FAULT,
    "mirror": DESTINATION,
    "mirrors": List(Obj({"destination": DESTINATION, "percentage": PERCENT}, required=("destination",))),
    "mirrorPercent": MIRROR_PERCENT,
    "mirror_percent": MIRROR_PERCENT,  # the CRD's alternative spelling of the deprecated field
    "mirrorPercentage": PERCENT,
    "corsPolicy": CORS_POLICY,
    "headers": HEADERS,
}, checks=(_check_http_route,))

ROUTE_DESTINATIONS = List(Obj({"destination": DESTINATION, "weight": Int(0, 100)}, required=("destination",)),
                          checks=(_check_weights,))
L4_MATCH_FIELDS: dict[str, Type] = {
    "destinationSubnets": List(Str(checks=(check_cidr,))),
    "port": Port(),
    "sourceLabels": Labels(),
    "gateways": List(Str(checks=(_check_gateway_ref,))),
    "sourceNamespace": Str(checks=(_check_source_namespace,)),
}
TLS_ROUTE = Obj({
    "match": List(Obj({
        **L4_MATCH_FIELDS,
        "sniHosts": List(Str(checks=(check_host,))),
    }, required=("sniHosts",))),
    "route": ROUTE_DESTINATIONS,
}, required=("match", "route"))
TCP_ROUTE = Obj({
    "match": List(Obj({**L4_MATCH_FIELDS, "sourceSubnet": Str(checks=(check_cidr,))})),
    "route": ROUTE_DESTINATIONS,
}, required=("route",))


def _check_delegate_virtual_service(vs: dict, path: Path, report: Report) -> None:
    """A VirtualService without hosts is a delegate: only HTTP routes, attached through its root."""
    for field, what in (("gateways", "gateways"), ("tls", "tls route"), ("tcp", "tcp route")):
        if _list(vs.get(field)):
            report.error((*path, field), f"delegate virtual service must have no {what} specified")
    for i, route in _dicts(vs.get("http")):
        if route.get("delegate") is not None:
            report.error((*path, "http", i, "delegate"), "delegate HTTP route cannot contain delegate")


def _check_virtual_service(vs: dict, path: Path, report: Report) -> None:
    hosts = _strs(vs.get("hosts"))
    gateways = [g for _, g in _strs(vs.get("gateways"))]
    for_mesh = not gateways or MESH_GATEWAY in gateways
    if not _list(vs.get("hosts")):
        _check_delegate_virtual_service(vs, path, report)
    if not any(_list(vs.get(f)) for f in ("http", "tcp", "tls")):
        report.error(path, "http, tcp or tls must be provided in virtual service")
    for n, (i, host) in enumerate(hosts):
        if host == "*" and for_mesh:
            report.error((*path, "hosts", i),
                         "wildcard host * is not allowed for virtual services bound to the mesh gateway")
        for _, earlier in hosts[:n]:
            if _hosts_overlap(earlier, host):
                report.error((*path, "hosts", i), f"duplicate hosts in virtual service: {earlier} & {host}")
    host_names = [h for _, h in hosts]
    for r, route in _dicts(vs.get("tls")):
        for m, match in _dicts(route.get("match")):
            for s, sni in _strs(match.get("sniHosts")):
                if not any(_host_subset(sni, h) for h in host_names):
                    report.error((*path, "tls", r, "match", m, "sniHosts", s),
                                 f"SNI host {sni!r} is not a compatible subset of any of the virtual service "
                                 f"hosts: [{', '.join(host_names)}]")
    if for_mesh:
        for r, route in _dicts(vs.get("http")):
            for m, match in _dicts(route.get("match")):
                for field in ("headers", "withoutHeaders"):
                    for key in _dict(match.get(field)):
                        if isinstance(key, str) and key.startswith(JWT_CLAIM_PREFIX):
                            report.error((*path, "http", r, "match", m, field, key),
                                         f"JWT claim based routing (key: {key}) is only supported for "
                                         f"gateway, found no gateways: {gateways}")


VIRTUAL_SERVICE = Obj({
    "hosts": List(Str(checks=(check_host,))),
    "gateways": List(Str(checks=(_check_gateway_ref,))),
    "http": List(HTTP_ROUTE),
    "tls": List(TLS_ROUTE),
    "tcp": List(TCP_ROUTE),
    "exportTo": _export_to(),
}, checks=(_check_virtual_service,))


# ---- WorkloadEntry and ServiceEntry


def _check_workload_entry(entry: dict, path: Path, report: Report) -> None:
    """An address is an IP, a DNS name or a unix socket; without one, the network must be named."""
    address = _str(entry.get("address"))
    if not address:
        network = _str(entry.get("network"))
        if not network:
            report.error((*path, "address"), "address is required")
        else:
            report.warning((*path, "address"), f"address is unset with network {network!r}")
    elif address.startswith(UNIX_PREFIX):
        _check_unix_address(address, (*path, "address"), report)
        if _dict(entry.get("ports")):
            report.error((*path, "ports"), f"unix endpoint {address} must not include ports")
    elif not _is_ip(address) and not _is_fqdn(address):
        report.error((*path, "address"), f"endpoint address {address!r} is not a valid FQDN or an IP address")


WORKLOAD_ENTRY = Obj({
    "address": Str(),
    "ports": Map(Port(), key=Str(checks=(_check_port_name,))),
    "labels": Labels(),
    "network": Str(),
    "locality": Str(),
    "weight": UINT32,
    "serviceAccount": Str(),
}, checks=(_check_workload_entry,))


def _check_service_entry_host(value: str, path: Path, report: Report) -> None:
    if value == "*":
        report.error(path, "hostname cannot be wildcard")
    elif value.startswith("*") and not value.startswith("*."):
        report.warning(path, f"partial wildcard {value!r} not allowed")
    else:
        check_host(value, path, report)


def _check_service_ports(ports: list, path: Path, report: Report) -> None:
    names: set[str] = set()
    numbers: set[int] = set()
    for i, port in _dicts(ports):
        name, number = port.get("name"), port.get("number")
        if isinstance(name, str) and name in names:
            report.error((*path, i, "name"), f"service entry port name {name!r} already defined")
        if _int(number) and number in numbers:
            report.error((*path, i, "number"), f"service entry port {number} already defined")
        names.add(_str(name))
        numbers.add(_int(number))


def _check_endpoints(se: dict, path: Path, report: Report, resolution: str) -> None:
    """Endpoints of STATIC entries are IPs (or sockets), of DNS entries names or IPs, on declared ports."""
    declared = {_str(p.get("name")) for _, p in _dicts(se.get("ports"))}
    endpoints = _dicts(se.get("endpoints"))
    for i, endpoint in endpoints:
        where = (*path, "endpoints", i)
        address = _str(endpoint.get("address"))
        unix = address.startswith(UNIX_PREFIX)
        if resolution == "STATIC" and address and not unix and not _is_ip(address) and _is_fqdn(address):
            report.error((*where, "address"), f"endpoint address {address!r} is not a valid IP address")
        if resolution == "STATIC" and unix and len(declared) != 1:
            report.error((*where, "address"), "exactly 1 service port required for unix endpoints")
        if resolution != "STATIC" and unix:
            report.error((*where, "address"),
                         f"endpoint address {address!r} is not a valid FQDN or an IP address")
        for name, number in _dict(endpoint.get("ports")).items():
            if isinstance(name, str) and name not in declared:
                report.error((*where, "ports", name),
                             f"endpoint port {number} is not defined by the service entry")


def _check_service_entry(se: dict, path: Path, report: Report) -> None:
    resolution = _str(se.get("resolution")) or "NONE"
    hosts = _strs(se.get("hosts"))
    addresses = [a for _, a in _strs(se.get("addresses"))]
    ports = [p for _, p in _dicts(se.get("ports"))]
    endpoints = _list(se.get("endpoints"))
    if any("/" in a for a in addresses) and resolution not in ("NONE", "STATIC"):
        report.error((*path, "addresses"), "CIDR addresses are allowed only for NONE/STATIC resolution types")
    if resolution == "NONE":
        if endpoints:
            report.error((*path, "endpoints"), "no endpoints should be provided for resolution type none")
        if se.get("workloadSelector") is not None:
            report.warning((*path, "workloadSelector"),
                           "workloadSelector should not be set when resolution mode is NONE")
    elif resolution == "STATIC" and not endpoints and se.get("workloadSelector") is None:
        report.error((*path, "endpoints"),
                     "endpoints must be provided if service entry discovery mode is static")
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
        bad_host = next(((i, h) for i, h in hosts if not _is_fqdn(h)), None)
        if not endpoints and bad_host is not None:
            report.error((*path, "hosts", bad_host[0]),
                         "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided "
                         f"for resolution mode {resolution}")
        if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
            report.error((*path, "endpoints"),
                         f"there must only be 0 or 1 endpoint for resolution mode {resolution}")
    elif resolution == "DYNAMIC_DNS":
        for i, host in hosts:
            if not host.startswith("*"):
                report.error((*path, "hosts", i), f"host must be wildcarded for resolution mode {resolution}")
        for field in ("addresses", "endpoints"):
            if _list(se.get(field)):
                report.error((*path, field), f"{field} cannot be set for resolution type {resolution}")
        for i, port in enumerate(ports):
            if _protocol(port.get("protocol")) not in ("HTTP", "TLS", "GRPC", "HTTP2"):
                report.error((*path, "ports", i, "protocol"), "only HTTP, TLS, GRPC, and HTTP2 protocols are "
                                                              f"supported for resolution type {resolution}")
    if resolution in ("STATIC", "DNS", "DNS_ROUND_ROBIN"):
        _check_endpoints(se, path, report, resolution)
    if resolution != "NONE" and len(hosts) > 1 and any(
            _protocol(p.get("protocol")) not in (*HTTP_PROTOCOLS, *TLS_PROTOCOLS) for p in ports):
        report.error((*path, "hosts"), "multiple hosts provided with non-HTTP, non-TLS ports")


SERVICE_ENTRY = Obj({
    "hosts": List(Str(checks=(_check_service_entry_host,))),
    "addresses": List(Str(checks=(check_cidr,))),
    "ports": List(Obj({
        "number": Port(),
        "protocol": Str(checks=(_check_protocol,)),
        "name": Str(checks=(_check_port_name,)),
        "targetPort": Port(),
    }, required=("number", "name")), checks=(_check_service_ports,)),
    "location": Str(enum=("MESH_EXTERNAL", "MESH_INTERNAL")),
    "resolution": Str(enum=("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")),
    "endpoints": List(WORKLOAD_ENTRY),
    "workloadSelector": Obj({"labels": Labels()}),
    "exportTo": _export_to(service_entry=True),
    "subjectAltNames": List(Str()),
}, required=("hosts",), one_of=(("workloadSelector", "endpoints"),), checks=(_check_service_entry,))


# ---- Gateway


def _check_server_tls(tls: dict, path: Path, report: Report) -> None:
    """Gateway/ingress TLS: where the certificate comes from must match the mode."""
    mode = _str(tls.get("mode")) or "PASSTHROUGH"
    if tls.get("minProtocolVersion") in ("TLSV1_0", "TLSV1_1") and not tls.get("cipherSuites"):
        report.warning((*path, "minProtocolVersion"),
                       "TLS version below TLSV1_2 require setting compatible ciphers as by default they no "
                       "longer include compatible ciphers.")
    if mode == "ISTIO_MUTUAL":
        _check_tls_mode_fields(tls, path, report, mode, (
            ("serverCertificate", "server certificate"), ("privateKey", "private key"),
            ("caCertificates", "CA bundle"), ("tlsCertificates", "tlsCertificates"),
            ("credentialName", "credentialName"), ("credentialNames", "credentialNames")))
        return
    cert_fields = ("caCrl", "serverCertificate", "privateKey", "caCertificates", "tlsCertificates",
                   "credentialName", "credentialNames")
    if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH") and any(tls.get(f) for f in cert_fields):
        report.warning(path, f"{mode} mode does not use certificates, they will be ignored")
    credential = bool(tls.get("credentialName")) or bool(tls.get("credentialNames"))
    sources = [bool(tls.get("serverCertificate") and tls.get("privateKey")), bool(tls.get("credentialName")),
               bool(tls.get("credentialNames")), bool(tls.get("tlsCertificates"))]
    if sum(sources) > 1:
        report.error(path, "only one of credentialName, credentialNames, serverCertificate/privateKey, "
                           "tlsCertificates should be specified")
    if mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
        if credential:
            return  # fetched from the secret; no files are needed
        prefix = "SIMPLE TLS" if mode == "SIMPLE" else "MUTUAL TLS"
        if mode != "SIMPLE" and not tls.get("caCertificates"):
            report.error((*path, "caCertificates"), f"{prefix} requires a client CA bundle")
        certs = [((*path, "tlsCertificates", i), c) for i, c in _dicts(tls.get("tlsCertificates"))]
        for where, cert in certs or [(path, tls)]:
            if not cert.get("serverCertificate"):
                report.error((*where, "serverCertificate"), f"{prefix} requires a server certificate")
            if not cert.get("privateKey"):
                report.error((*where, "privateKey"), f"{prefix} requires a private key")
    if tls.get("caCrl") and tls.get("credentialName"):
        report.error((*path, "caCrl"),
                     "CRL is not supported with credentialName. CRL has to be specified in the credential")
    if tls.get("caCrl") and mode == "SIMPLE":
        report.error((*path, "caCrl"), "CRL is not supported with SIMPLE TLS")


TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
SERVER_TLS = Obj({
    "httpsRedirect": Bool(),
    "mode": Str(enum=("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL",
                      "OPTIONAL_MUTUAL")),
    "serverCertificate": Str(),
    "privateKey": Str(),
    "caCertificates": Str(),
    "caCrl": Str(),
    "credentialName": Str(),
    "credentialNames": List(Str(), min_items=1),
    "caCertCredentialName": Str(),
    "tlsCertificates": List(Obj({"serverCertificate": Str(), "privateKey": Str(), "caCertificates": Str()}),
                            min_items=1),
    "subjectAltNames": List(Str()),
    "verifyCertificateSpki": List(Str()),
    "verifyCertificateHash": List(Str()),
    "minProtocolVersion": Str(enum=TLS_VERSIONS),
    "maxProtocolVersion": Str(enum=TLS_VERSIONS),
    "cipherSuites": List(Str()),
    "insecureSkipVerify": Bool(),
}, checks=(_check_server_tls,))


def _check_server_protocol(value: str, path: Path, report: Report) -> None:
    if not _protocol(value):
        report.error(path, f"invalid protocol {value!r}, supported protocols are {', '.join(PROTOCOLS)}")


def _check_no_target_port(port: dict, path: Path, report: Report, kind: str) -> None:
    if _int(port.get("targetPort")):
        report.error((*path, "targetPort"), f"targetPort has no impact on {kind}")


def _check_server(server: dict, path: Path, report: Report) -> None:
    port, bind = _dict(server.get("port")), _str(server.get("bind"))
    number = port.get("number")
    if bind.startswith(UNIX_PREFIX) and _int(number):
        report.error((*path, "port", "number"), "port number must be 0 for unix domain socket")
    elif not bind.startswith(UNIX_PREFIX) and port and (number is None or number == 0):
        report.error((*path, "port", "number"), "port number 0 must be in the range 1..65535")
    protocol, tls = _protocol(port.get("protocol")), server.get("tls")
    if not protocol:
        return
    if protocol in TLS_PROTOCOLS and tls is None:
        report.error((*path, "tls"), "server must have TLS settings for HTTPS/TLS protocols")
    elif protocol not in TLS_PROTOCOLS and isinstance(tls, dict):
        if protocol not in HTTP_PROTOCOLS:
            report.error((*path, "tls"), "server cannot have TLS settings for non HTTPS/TLS ports")
        elif _str(tls.get("mode")) not in ("", "PASSTHROUGH", "AUTO_PASSTHROUGH") or any(
                tls.get(f) for f in ("caCertificates", "privateKey", "serverCertificate")):
            report.error((*path, "tls"), "server cannot have TLS settings for plain text HTTP ports")


def _check_gateway(gateway: dict, path: Path, report: Report) -> None:
    name = report.context.get("resource", "")
    if name and not _is_label(name):
        report.error(("metadata", "name"), f"invalid gateway name: {name!r}")
    servers = _dicts(gateway.get("servers"))
    if not _list(gateway.get("servers")):
        report.error((*path, "servers"), "gateway must have at least one server")
    names: set[str] = set()
    for i, server in servers:
        port = _dict(server.get("port"))
        port_name = port.get("name")
        if isinstance(port_name, str) and port_name in names:
            report.error((*path, "servers", i, "port", "name"),
                         f"port names in servers must be unique: duplicate name {port_name}")
        names.add(_str(port_name))
        if _dict(server.get("tls")).get("httpsRedirect") is True and _protocol(port.get("protocol")) not in (
                "", *HTTP_PROTOCOLS):
            report.warning((*path, "servers", i, "tls", "httpsRedirect"),
                           "tls.httpsRedirect should only be used with http servers")


GATEWAY = Obj({
    "servers": List(Obj({
        "port": Obj({
            "number": Int(0, 65535),
            "protocol": Str(checks=(_check_server_protocol,)),
            "name": Str(),
            "targetPort": UINT32,
        }, required=("protocol", "name"), checks=(partial(_check_no_target_port, kind="Gateways"),)),
        "bind": Str(checks=(_check_bind,)),
        "hosts": List(Str(checks=(partial(_check_namespaced_host, gateway=True),))),
        "tls": SERVER_TLS,
        "defaultEndpoint": Str(),
        "name": Str(),
    }, required=("port", "hosts"), checks=(_check_server,))),
    "selector": Labels(),
}, checks=(_check_gateway,))


# ---- Sidecar


def _check_default_endpoint(value: str, path: Path, report: Report) -> None:
    """Inbound traffic goes to the app on loopback (or any local address) or a unix socket."""
    if value.startswith(UNIX_PREFIX):
        _check_unix_address(value, path, report)
        return
    host, colon, port = value.rpartition(":")
    if not colon:
        report.error(path, f"address {value}: missing port in address")
        return
    if host.removeprefix("[").removesuffix("]") not in ("", "127.0.0.1", "0.0.0.0", "::1", "::"):
        report.error(path, "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,"
                           "[::1]:port,[::]:port,unix://filepath or unset")
    if not _DIGITS.fullmatch(port):
        report.error(path, f"sidecar: defaultEndpoint port ({port}) is not a number")
    elif not 1 <= int(port) <= 65535:
        report.error(path, f"port number {int(port)} must be in the range 1..65535")


def _check_ingress(listener: dict, path: Path, report: Report) -> None:
    tls = listener.get("tls")
    if not isinstance(tls, dict):
        return
    for field, message in (("subjectAltNames", "sidecar: subjectAltNames is not supported in ingress tls"),
                           ("httpsRedirect", "sidecar: httpsRedirect is not supported"),
                           ("credentialName", "sidecar: credentialName is not currently supported"),
                           ("credentialNames", "sidecar: credentialNames is not currently supported"),
                           ("tlsCertificates", "sidecar: tls_certificates is not currently supported")):
        if tls.get(field):
            report.error((*path, "tls", field), message)
    if tls.get("mode") in ("ISTIO_MUTUAL", "AUTO_PASSTHROUGH"):
        report.error((*path, "tls", "mode"),
                     f"configuration is invalid: cannot set mode to {tls['mode']} in sidecar ingress tls")
    if _protocol(_dict(listener.get("port")).get("protocol")) not in TLS_PROTOCOLS:
        report.error((*path, "tls"), "server cannot have TLS settings for non HTTPS/TLS ports")


def _check_egress(listener: dict, path: Path, report: Report) -> None:
    port = listener.get("port")
    if not isinstance(port, dict):
        return
    bind, capture = _str(listener.get("bind")), _str(listener.get("captureMode"))
    if _int(port.get("number")):
        if bind:
            check_ip(bind, (*path, "bind"), report)
        return
    if not bind.startswith(UNIX_PREFIX):
        report.error((*path, "bind"),
                     "sidecar: ports with 0 value must have a unix domain socket bind address")
    else:
        _check_unix_address(bind, (*path, "bind"), report)
    if capture not in ("", "DEFAULT", "NONE"):
        report.error((*path, "captureMode"),
                     "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners")


def _check_unique_ports(listeners: list, path: Path, report: Report) -> None:
    """Listeners bound to IPs are keyed by port; socket listeners by their path."""
    seen: set[int | str] = set()
    for i, listener in _dicts(listeners):
        port = listener.get("port")
        if not isinstance(port, dict):
            continue
        number = _int(port.get("number"))
        key: int | str = number or _str(listener.get("bind"))
        if key in seen:
            report.error((*path, i, "port"), "sidecar: ports on IP bound listeners must be unique" if number
                         else "sidecar: unix domain socket values for listeners must be unique")
        seen.add(key)


def _check_catch_all_egress(listeners: list, path: Path, report: Report) -> None:
    """One egress listener may omit its port, and it has to come last."""
    catch_all = [i for i, listener in _dicts(listeners) if listener.get("port") is None]
    for n, i in enumerate(catch_all):
        if n:
            report.error((*path, i), "sidecar: egress can have only one listener with empty port")
        elif i != len(listeners) - 1:
            report.error((*path, i), "sidecar: the egress listener with empty port should be the last "
                                     "listener in the list")


def _check_outbound_policy(policy: dict, path: Path, report: Report) -> None:
    proxy = policy.get("egressProxy")
    if proxy is None:
        return
    if policy.get("mode") != "ALLOW_ANY":
        report.error((*path, "egressProxy"),
                     "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode")
    elif isinstance(proxy, dict) and proxy.get("port") is None:
        report.error((*path, "egressProxy", "port"), "sidecar: egress_proxy port must be non-nil")


def _check_sidecar(sidecar: dict, path: Path, report: Report) -> None:
    if not _list(sidecar.get("egress")) and not _list(sidecar.get("ingress")) \
            and sidecar.get("outboundTrafficPolicy") is None and sidecar.get("inboundConnectionPool") is None:
        report.error(path, "sidecar: empty configuration provided")
    selector = sidecar.get("workloadSelector")
    if isinstance(selector, dict) and not selector.get("labels"):
        report.warning((*path, "workloadSelector"), "sidecar: workload selector specified without labels, "
                                                    "will be applied to all services in namespace")


def _sidecar_port(number: Type, required: tuple[str, ...] = ()) -> Obj:
    return Obj({
        "number": number,
        "protocol": Str(checks=(_check_protocol,)),
        "name": Str(checks=(_check_port_name,)),
        "targetPort": UINT32,
    }, required=required, checks=(partial(_check_no_target_port, kind="Sidecars"),))


CAPTURE_MODES = ("DEFAULT", "IPTABLES", "NONE")
SIDECAR = Obj({
    "workloadSelector": Obj({"labels": Labels()}),
    "ingress": List(Obj({
        "port": _sidecar_port(Port(), required=("number",)),
        "bind": Str(checks=(check_ip,)),
        "captureMode": Str(enum=CAPTURE_MODES),
        "defaultEndpoint": Str(checks=(_check_default_endpoint,)),
        "tls": SERVER_TLS,
        "connectionPool": CONNECTION_POOL,
    }, required=("port",), checks=(_check_ingress,)), checks=(_check_unique_ports,)),
    "egress": List(Obj({
        "port": _sidecar_port(Int(0, 65535)),
        "bind": Str(),
        "captureMode": Str(enum=CAPTURE_MODES),
        "hosts": List(Str(checks=(partial(_check_namespaced_host, gateway=False),))),
    }, required=("hosts",), checks=(_check_egress,)), checks=(_check_unique_ports, _check_catch_all_egress)),
    "inboundConnectionPool": CONNECTION_POOL,
    "outboundTrafficPolicy": Obj({
        "mode": Str(enum=("REGISTRY_ONLY", "ALLOW_ANY")),
        "egressProxy": DESTINATION,
    }, checks=(_check_outbound_policy,)),
}, checks=(_check_sidecar,))


SCHEMAS: dict[str, Type] = {
    "VirtualService": VIRTUAL_SERVICE,
    "DestinationRule": DESTINATION_RULE,
    "ServiceEntry": SERVICE_ENTRY,
    "WorkloadEntry": WORKLOAD_ENTRY,
    "Gateway": GATEWAY,
    "Sidecar": SIDECAR,
}
