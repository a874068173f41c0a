"""HTTP routing for the sidecar: pilot's route configs compiled into matchers (Envoy's router).

`RouteConfig(spec)` compiles one `routes["<port>"]` of the per-proxy config (the schema is
in controlplane.pilot.networking). All the work that does not depend on the request is
done then: regexes compiled, names lower-cased, weights accumulated, the prefix a rewrite
replaces measured. A request then costs one dict lookup for its virtual host and, per route
tried, a few string comparisons; a route without conditions costs nothing to try.

Per-route decisions (which weighted cluster, whether to inject a fault or mirror, whether
and when to retry) take uniform numbers in [0, 1) from the caller (`rng.random()`), so the
proxy owns its randomness and tests can fix it. Time is never read here.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote

from dataplane.proxy.cluster import CONNECT_FAILURE, GATEWAY_ERRORS, REFUSED_STREAM, RESET, TIMEOUT
from dataplane.proxy.http.serialize import valid_field

# Envoy's retry back-off: jittered exponential from 25 ms, capped at ten times the base.
DEFAULT_BACKOFF_MS = 25
BACKOFF_CAP_FACTOR = 10
GRPC_RETRY_ON = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
                 "unavailable": 14}
EMPTY: Mapping[str, str] = {}

Predicate = Callable[[str], object]
Condition = Callable[["Request"], object]


class Request:
    """What routing reads from a request. Header names are lower-case, and a repeated header's
    values are joined with "," (that joined value is what Envoy matches)."""

    __slots__ = ("_query", "authority", "headers", "method", "path", "scheme", "uri")

    def __init__(self, method: str, path: str, authority: str, headers: Mapping[str, str] = EMPTY,
                 scheme: str = "http") -> None:
        self.method = method
        self.path = path
        i = path.find("?")
        self.uri = path if i < 0 else path[:i]  # what uri matches see: the path without its query
        self.authority = authority
        self.headers = headers
        self.scheme = scheme
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        """Decoded query parameters, parsed on first use (only query_params matches need them);
        the first of repeated parameters wins."""
        if self._query is None:
            self._query = parse_query(self.path)
        return self._query


def parse_query(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    _, _, query = path.partition("?")
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            out.setdefault(unquote(name), unquote(value))
    return out


def string_predicate(spec: Mapping[str, Any], ignore_case: bool = False) -> Predicate | None:
    """A StringMatch as a test of a value; None for `present` (any value matches). Regexes must
    match the whole value, as Envoy's do."""
    if "exact" in spec:
        exact = spec["exact"].lower() if ignore_case else spec["exact"]
        return (lambda s: s.lower() == exact) if ignore_case else exact.__eq__
    if "prefix" in spec:
        prefix = spec["prefix"].lower() if ignore_case else spec["prefix"]
        return (lambda s: s.lower().startswith(prefix)) if ignore_case else (lambda s: s.startswith(prefix))
    if "regex" in spec:
        return re.compile(spec["regex"]).fullmatch
    return None


def _attribute(field: str, test: Predicate) -> Condition:
    if field == "uri":
        return lambda r: test(r.uri)
    if field == "method":
        return lambda r: test(r.method)
    if field == "authority":
        return lambda r: test(r.authority)
    return lambda r: test(r.scheme)


def _uri(spec: Mapping[str, Any], ignore_case: bool) -> Condition | None:
    """Exact and prefix, Istio's usual uri matches, test the uri inline: one call, not two."""
    if not ignore_case and "exact" in spec:
        exact = spec["exact"]
        return lambda r: r.uri == exact
    if not ignore_case and "prefix" in spec:
        prefix = spec["prefix"]
        return lambda r: r.uri.startswith(prefix)
    test = string_predicate(spec, ignore_case)
    return None if test is None else _attribute("uri", test)


def _header(name: str, spec: Mapping[str, Any], without: bool) -> Condition:
    if "exact" in spec:  # the usual header match, inline (a missing header is None, never equal)
        exact = spec["exact"]
        if without:
            return lambda r: r.headers.get(name) != exact
        return lambda r: r.headers.get(name) == exact
    test = string_predicate(spec)
    if test is None:
        return (lambda r: name not in r.headers) if without else (lambda r: name in r.headers)
    if without:  # Istio: the route is out only when the header is there and matches
        return lambda r: (v := r.headers.get(name)) is None or not test(v)
    return lambda r: (v := r.headers.get(name)) is not None and test(v)


def _query_param(name: str, test: Predicate | None) -> Condition:
    if test is None:
        return lambda r: name in r.query
    return lambda r: (v := r.query.get(name)) is not None and test(v)


def compile_match(match: Mapping[str, Any]) -> tuple[Condition, ...]:
    """A route's match as conditions that must all hold, cheapest (no header lookup) first."""
    out: list[Condition] = []
    uri = _uri(match["uri"], bool(match.get("ignore_uri_case"))) if "uri" in match else None
    if uri is not None:
        out.append(uri)
    for field in ("method", "scheme", "authority"):
        test = string_predicate(match[field]) if field in match else None
        if test is not None:
            out.append(_attribute(field, test))
    for name, spec in (match.get("headers") or {}).items():
        out.append(_header(name, spec, without=False))
    for name, spec in (match.get("without_headers") or {}).items():
        out.append(_header(name, spec, without=True))
    for name, spec in (match.get("query_params") or {}).items():
        out.append(_query_param(name, string_predicate(spec)))
    return tuple(out)


class HeaderOps:
    """One direction of Istio's Headers, compiled to bytes once per config; the proxy applies it
    to a message's field list as Envoy does: drop `remove` and the names `set` replaces (`kept`),
    then append the `set` values and then the `add` ones as field lines of their own (`add`:
    an added value is one more line, as Envoy's append, never a comma-joined rewrite).

    Names are lower-cased; a configured field that could not be sent as is (not a token name, a
    control character in the value, not latin-1) is left out."""

    __slots__ = ("add", "remove")

    def __init__(self, spec: Mapping[str, Any] | None) -> None:
        spec = spec or {}
        sets = [(str(k).lower(), str(v)) for k, v in (spec.get("set") or {}).items()]
        adds = [(str(k).lower(), str(v)) for k, v in (spec.get("add") or {}).items()]
        self.add: tuple[bytes, ...] = tuple(line for n, v in (*sets, *adds) if (line := _field_line(n, v)))
        self.remove = frozenset(_latin1(str(n).lower()) for n in (*(spec.get("remove") or ()), *dict(sets)))

    def __bool__(self) -> bool:
        return bool(self.remove or self.add)

    def kept(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`fields` without the ones this removes or replaces (the same list when none goes)."""
        remove = self.remove
        return [f for f in fields if f[0] not in remove] if remove else fields

    @staticmethod
    def then(first: HeaderOps | None, second: HeaderOps | None) -> HeaderOps | None:
        """`first` applied, then `second`, as one set of operations (a weighted cluster's, then
        the route's: the less specific wins, Envoy's default)."""
        if not first or not second:
            return first or second or None
        merged = HeaderOps.__new__(HeaderOps)
        merged.remove = first.remove | second.remove
        merged.add = (*(a for a in first.add if a.partition(b":")[0] not in second.remove), *second.add)
        return merged


def _latin1(text: str) -> bytes:
    return text.encode("latin-1", "replace")


def _field_line(name: str, value: str) -> bytes | None:
    try:
        n, v = name.encode("latin-1"), value.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return n + b": " + v if valid_field(n, v) else None


class WeightedCluster:
    __slots__ = ("name", "request_headers", "response_headers", "weight")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.name: str = spec["name"]
        self.weight: int = spec["weight"]
        headers = spec.get("headers") or {}
        self.request_headers = HeaderOps(headers.get("request"))
        self.response_headers = HeaderOps(headers.get("response"))


class Fault(NamedTuple):
    """What fault injection decided for one request: 0 ms and None for nothing."""

    delay_ms: int
    http_status: int | None
    grpc_status: int | None


class FaultPolicy:
    __slots__ = ("abort_pct", "delay_ms", "delay_pct", "grpc_status", "http_status")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        delay, abort = spec.get("delay") or {}, spec.get("abort") or {}
        self.delay_ms: int = delay.get("fixed_delay_ms", 0)
        self.delay_pct: float = delay.get("percentage", 0.0)
        self.http_status: int | None = abort.get("http_status")
        self.grpc_status: int | None = abort.get("grpc_status")
        self.abort_pct: float = abort.get("percentage", 0.0)

    def decide(self, u_delay: float, u_abort: float) -> Fault:
        """Delay and abort are drawn independently, each firing when 100·u < its percentage."""
        delay = self.delay_ms if u_delay * 100 < self.delay_pct else 0
        if u_abort * 100 < self.abort_pct:
            return Fault(delay, self.http_status, self.grpc_status)
        return Fault(delay, None, None)


class RetryPolicy:
    """Istio's retries as Envoy applies them: `attempts` retries after the first try, each for
    a reason in `retry_on`, spaced by a jittered exponential back-off. How many retries may be
    in flight at once is the cluster's business (`Cluster.pool.retries`, Istio's maxRetries)."""

    __slots__ = ("_failures", "_grpc", "_statuses", "attempts", "base_ms", "per_try_timeout_ms", "retry_on")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.attempts: int = spec.get("attempts", 0)
        self.per_try_timeout_ms: int = spec.get("per_try_timeout_ms", 0)
        self.base_ms: int = spec.get("backoff_ms") or DEFAULT_BACKOFF_MS
        self.retry_on = frozenset(spec.get("retry_on") or ())
        statuses: set[int] = set()
        failures: set[str] = set()
        on = self.retry_on
        if "5xx" in on:
            statuses.update(range(500, 600))
        if "gateway-error" in on:
            statuses |= GATEWAY_ERRORS
        if "retriable-4xx" in on:
            statuses.add(409)
        if "retriable-status-codes" in on:
            statuses.update(spec.get("retriable_status_codes") or ())
        if on & {"5xx", "gateway-error", "reset"}:  # Envoy counts any reset as a 5xx
            failures |= {CONNECT_FAILURE, RESET, REFUSED_STREAM, TIMEOUT}
        if "connect-failure" in on:
            failures.add(CONNECT_FAILURE)
        if "refused-stream" in on:
            failures.add(REFUSED_STREAM)
        self._statuses = frozenset(statuses)
        self._failures = frozenset(failures)
        self._grpc = frozenset(GRPC_RETRY_ON[k] for k in on if k in GRPC_RETRY_ON)

    def should_retry(self, retries_done: int, status: int | None = None, failure: str | None = None,
                     grpc_status: int | None = None) -> bool:
        """Whether a try that ended with `status` (a response), `failure` (no response: one of
        cluster.py's failure kinds; `overflow` never retries) or `grpc_status` earns a retry."""
        if retries_done >= self.attempts:
            return False
        if failure is not None:
            return failure in self._failures
        return status in self._statuses or grpc_status in self._grpc

    def backoff_ms(self, retry: int, u: float) -> int:
        """The wait before retry number `retry` (1 for the first): uniform below
        base·2^(retry-1), that bound capped at ten times the base (Envoy's strategy)."""
        bound = min(self.base_ms << min(retry - 1, 30), self.base_ms * BACKOFF_CAP_FACTOR)
        return int(u * bound)


class Mirror(NamedTuple):
    cluster: str
    percentage: float

    def sampled(self, u: float) -> bool:
        return u * 100 < self.percentage


class Rewrite:
    """Envoy's prefix_rewrite / regex_rewrite and host rewrite. A uri rewrite replaces the part
    of the path the route's uri match matched: its prefix, or the whole path for an exact or
    regex match; a route without a uri match matched the prefix "/"."""

    __slots__ = ("authority", "prefix_len", "regex", "substitution", "uri")

    def __init__(self, spec: Mapping[str, Any], uri_match: Mapping[str, Any] | None) -> None:
        self.uri: str | None = spec.get("uri")
        self.authority: str | None = spec.get("authority")
        regex = spec.get("uri_regex")
        self.regex = re.compile(regex["match"]) if regex else None
        self.substitution: str = regex["rewrite"] if regex else ""
        self.prefix_len = matched_prefix_len(uri_match)

    def path(self, path: str) -> str:
        """The path to forward (the query string is kept as it was)."""
        if self.uri is None and self.regex is None:
            return path
        i = path.find("?")
        uri, query = (path, "") if i < 0 else (path[:i], path[i:])
        if self.regex is not None:
            return self.regex.sub(self.substitution, uri) + query
        keep = "" if self.prefix_len < 0 else uri[self.prefix_len:]
        return f"{self.uri}{keep}{query}"


def matched_prefix_len(uri_match: Mapping[str, Any] | None) -> int:
    """How much of the path a route's uri match claims: -1 for all of it."""
    if not uri_match:
        return 1
    return len(uri_match["prefix"]) if "prefix" in uri_match else -1


DEFAULT_PORTS = {"http": "80", "https": "443"}


class Redirect:
    """Istio's HTTPRedirect as an absolute Location."""

    __slots__ = ("authority", "code", "derive_port", "port", "prefix_len", "prefix_rewrite", "scheme", "uri")

    def __init__(self, spec: Mapping[str, Any], uri_match: Mapping[str, Any] | None) -> None:
        self.uri: str | None = spec.get("uri")
        self.authority: str | None = spec.get("authority")
        self.scheme: str | None = spec.get("scheme")
        self.port: int | None = spec.get("port")
        self.derive_port: str | None = spec.get("derive_port")
        self.prefix_rewrite: str | None = spec.get("prefix_rewrite")
        self.code: int = spec.get("redirect_code", 301)
        self.prefix_len = matched_prefix_len(uri_match)

    def location(self, request: Request) -> str:
        scheme = self.scheme or request.scheme
        host, port = split_host_port(self.authority or request.authority)
        if self.port is not None:
            port = str(self.port)
        elif self.derive_port == "FROM_REQUEST_PORT":
            port = split_host_port(request.authority)[1]
        elif self.derive_port == "FROM_PROTOCOL_DEFAULT" or (not self.authority and scheme != request.scheme):
            port = ""
        if port == DEFAULT_PORTS.get(scheme):
            port = ""
        path = request.path
        if self.uri is not None:
            query = request.path[len(request.uri):]
            path = self.uri if "?" in self.uri else self.uri + query
        elif self.prefix_rewrite is not None:
            keep = "" if self.prefix_len < 0 else request.uri[self.prefix_len:]
            path = self.prefix_rewrite + keep + request.path[len(request.uri):]
        return f"{scheme}://{host}{':' + port if port else ''}{path}"


def split_host_port(authority: str) -> tuple[str, str]:
    """("host", "port") from "host:port", "[v6]:port" or a bare host (port "")."""
    host, _, port = authority.rpartition(":")
    if not host or "]" in port:
        return authority, ""
    return host, port


class DirectResponse(NamedTuple):
    status: int
    body: str


class Route:
    """One compiled route; exactly one of `clusters`, `redirect`, `direct_response` is set."""

    __slots__ = ("_cumulative", "_single", "clusters", "conditions", "cors", "direct_response", "fault",
                 "mirrors", "name", "redirect", "request_headers", "response_headers", "retry", "rewrite",
                 "timeout_ms", "virtual_service")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        match = spec.get("match") or {}
        self.name: str = spec.get("name", "")
        self.virtual_service: str = spec.get("virtual_service", "")
        self.conditions = compile_match(match)
        self.clusters = tuple(WeightedCluster(c) for c in spec.get("clusters") or ())
        total = 0
        cumulative = []
        for c in self.clusters:
            total += c.weight
            cumulative.append(total)
        self._cumulative = [c / total for c in cumulative] if total else []
        self._single = self.clusters[0] if len(self.clusters) == 1 else None
        self.redirect = Redirect(spec["redirect"], match.get("uri")) if "redirect" in spec else None
        direct = spec.get("direct_response")
        self.direct_response = DirectResponse(direct["status"], direct.get("body", "")) if direct else None
        self.timeout_ms: int = spec.get("timeout_ms", 0)
        retries = spec.get("retries")
        self.retry = RetryPolicy(retries) if retries and retries.get("attempts") else None
        self.fault = FaultPolicy(spec["fault"]) if spec.get("fault") else None
        self.mirrors = tuple(Mirror(m["cluster"], m["percentage"]) for m in spec.get("mirrors") or ())
        self.rewrite = Rewrite(spec["rewrite"], match.get("uri")) if spec.get("rewrite") else None
        headers = spec.get("headers") or {}
        self.request_headers = HeaderOps(headers.get("request"))
        self.response_headers = HeaderOps(headers.get("response"))
        self.cors: dict[str, Any] | None = spec.get("cors")

    def pick_cluster(self, u: float) -> WeightedCluster | None:
        """The weighted cluster for a uniform u in [0, 1): cluster i takes weight_i/total of u."""
        if self._single is not None:
            return self._single
        if not self._cumulative:
            return None
        return self.clusters[bisect_right(self._cumulative, u)]


class VirtualHost:
    __slots__ = ("domains", "name", "routes", "service")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.name: str = spec["name"]
        self.service: str = spec.get("service", "")
        self.domains: tuple[str, ...] = tuple(spec.get("domains") or ())
        self.routes = tuple(Route(r) for r in spec.get("routes") or ())

    def match(self, request: Request) -> Route | None:
        """The first route whose conditions all hold; None is Envoy's 404 (no route)."""
        for route in self.routes:
            for condition in route.conditions:
                if not condition(request):
                    break
            else:
                return route
        return None


class RouteConfig:
    """One port's routes: virtual hosts by exact domain, then wildcard suffixes (longest first),
    then the "*" fallback."""

    __slots__ = ("_exact", "_fallback", "_suffixes", "name", "spec", "virtual_hosts")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.name: str = spec.get("name", "")
        self.virtual_hosts = tuple(VirtualHost(v) for v in spec.get("virtual_hosts") or ())
        self._exact: dict[str, VirtualHost] = {}
        self._fallback: VirtualHost | None = None
        suffixes: list[tuple[str, VirtualHost]] = []
        for vh in self.virtual_hosts:
            for domain in vh.domains:
                domain = domain.lower()
                if domain == "*":
                    self._fallback = self._fallback or vh
                elif domain.startswith("*"):
                    suffixes.append((domain[1:], vh))
                else:
                    self._exact.setdefault(domain, vh)
        self._suffixes = tuple(sorted(suffixes, key=lambda s: -len(s[0])))

    def select_virtual_host(self, host: str) -> VirtualHost | None:
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        host = host.lower()
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        for suffix, candidate in self._suffixes:
            if len(host) > len(suffix) and host.endswith(suffix):
                return candidate
        return self._fallback

    def match(self, request: Request) -> Route | None:
        vh = self.select_virtual_host(request.authority)
        return None if vh is None else vh.match(request)


def build_route_configs(config: Mapping[str, Any],
                        previous: Mapping[str, RouteConfig] | None = None) -> dict[str, RouteConfig]:
    """Every route config of a proxy config by name ("9080"); one whose spec equals the one in
    `previous` is kept rather than compiled again (routes hold no state, so this only saves time)."""
    out: dict[str, RouteConfig] = {}
    for name, spec in (config.get("routes") or {}).items():
        old = (previous or {}).get(name)
        out[name] = old if old is not None and old.spec == spec else RouteConfig(spec)
    return out
