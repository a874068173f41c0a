"""AuthorizationPolicy on the inbound side: Istio's RBAC filters, sans-IO.

Pilot resolves which policies select the workload and sends them in evaluation order
(`security.authorization`, see controlplane.pilot.networking); `compile_policies` turns that
list into an `Authz` once per config, and the inbound paths ask it per request
(`check_http`) or per connection (`check_tcp`). With no policy `Authz.active` is False and the
caller skips the check: one attribute read.

Semantics (istio security/v1 AuthorizationPolicy):
* DENY first: any matching DENY policy denies. Then ALLOW: if any ALLOW policy applies to the
  workload, at least one must match, else the request is denied; without ALLOW policies it is
  allowed. AUDIT never changes the outcome: a match is reported in `Decision.audit`.
  CUSTOM needs an external authorization provider, which this proxy has none of: such a
  config cannot be applied (PolicyError, which the runtime turns into a NACK).
* A policy matches when one of its rules does; `rules` absent or empty matches nothing (so
  an ALLOW policy without rules denies everything), while a rule `{}` matches everything.
  Within a rule, `from` entries are OR'ed, `to` entries are OR'ed, every `when` condition must
  hold, and all three must; within a source or operation every present field must match
  (AND), each by any of its values (OR), and no `not*` value may match.
* Strings match as Istio's: exact, prefix `abc*`, suffix `*abc`, and `*` alone for "present"
  (so it never matches a missing value, e.g. the principal of a plain-text peer). Hosts
  compare case-insensitively; paths without their query, as the proxy normalised them before
  asking (meshConfig.pathNormalization, http/pathnorm.py), so dot segments and escapes cannot
  slip past a policy.
* Identity comes from the peer certificate: `principal` is its SPIFFE id
  (`spiffe://<td>/ns/<ns>/sa/<sa>`, empty unless the connection was mutual TLS), written in
  policies without the `spiffe://`; namespaces, service accounts and trust domains derive from
  it. ipBlocks and remoteIpBlocks both match the peer address (no X-Forwarded-For here).
* TCP connections carry no method, path, host or header. As Istio does for TCP filter chains,
  a rule using any such HTTP-only field (methods, paths, hosts, their not* forms and
  `request.headers[...]` conditions) never matches in an ALLOW policy, and in a DENY or AUDIT
  policy is evaluated as if those fields matched (the rest of the rule still decides): when in
  doubt a TCP connection is denied rather than let through.

Not supported (PolicyError naming the field or key, so the NACK says why): requestPrincipals
and `request.auth.*` (no JWT validation here), `destination.ip`, `connection.sni`,
`experimental.*` conditions, and `{*}`/`{**}` path templates.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
SPIFFE = "spiffe://"
DENIED_BODY = b"RBAC: access denied"  # Envoy's local reply body for a request RBAC denied

_SOURCE_FIELDS = frozenset({"principals", "notPrincipals", "namespaces", "notNamespaces",
                            "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains",
                            "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
                            "requestPrincipals", "notRequestPrincipals"})
_OPERATION_FIELDS = frozenset({"methods", "notMethods", "paths", "notPaths", "ports", "notPorts", "hosts",
                               "notHosts"})
_HTTP_FIELDS = frozenset({"methods", "paths", "hosts"})  # of an operation, in their positive form
_RULE_FIELDS = frozenset({"from", "to", "when"})


class PolicyError(ValueError):
    """An authorization policy this proxy cannot enforce; the message names the policy and why."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request or connection: `policy` is the deciding policy ("" when no
    policy decided: allowed for lack of policies, or denied for lack of a matching ALLOW);
    `audit` names the AUDIT policy that matched, if any."""

    allowed: bool
    policy: str = ""
    audit: str = ""


ALLOWED = Decision(True)


class _Peer:
    """What a check looks at, parsed only as far as the policies ask."""

    __slots__ = ("_identity", "_ip", "headers", "host", "method", "path", "port", "principal", "source_ip",
                 "tcp")

    def __init__(self, source_ip: str, principal: str, port: int, method: str = "", path: str = "",
                 host: str = "", headers: Mapping[str, str] | None = None, tcp: bool = False) -> None:
        self.source_ip = source_ip
        self.principal = principal[len(SPIFFE):] if principal.startswith(SPIFFE) else principal
        self.port = port
        self.method = method
        self.path = path
        self.host = host
        self.headers = headers if headers is not None else {}
        self.tcp = tcp
        self._ip: tuple[int, int] | None = None
        self._identity: tuple[str, str, str] | None = None

    @property
    def ip(self) -> tuple[int, int] | None:
        """The source address as (family, int); None when it is no IP address (no block matches)."""
        if self._ip is None:
            self._ip = _ip(self.source_ip.partition("%")[0]) or (0, 0)
        return self._ip if self._ip[0] else None

    @property
    def identity(self) -> tuple[str, str, str]:
        """(trust domain, namespace, service account) of the principal; empty ones when it is not
        of the form <td>/ns/<ns>/sa/<sa> (or there is none)."""
        if self._identity is None:
            parts = self.principal.split("/")
            ok = len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa"
            self._identity = (parts[0], parts[2], parts[4]) if ok else ("", "", "")
        return self._identity


Matcher = Callable[[_Peer], bool]


def _strings(patterns: list[str]) -> Callable[[str], bool]:
    """Istio's string match on a present (non-empty) value, any of `patterns`: `*`, `abc*`,
    `*abc` or exact (one set lookup and two C-level affix checks, whatever their number)."""
    if "*" in patterns:
        return bool
    exact = frozenset(v for v in patterns if not v.startswith("*") and not v.endswith("*"))
    prefixes = tuple(v[:-1] for v in patterns if v.endswith("*"))
    suffixes = tuple(v[1:] for v in patterns if v.startswith("*"))
    return lambda v: bool(v) and (v in exact or v.startswith(prefixes) or v.endswith(suffixes))


def _ip(text: str) -> tuple[int, int] | None:
    """(address family, address as an int), or None for no IP address."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, int.from_bytes(socket.inet_pton(family, text), "big")
        except OSError:
            continue
    return None


def _all(matchers: list[Matcher], p: _Peer) -> bool:
    """all() without a generator per call (this runs per request; so do the loops below)."""
    for m in matchers:  # noqa: SIM110
        if not m(p):
            return False
    return True


def _any_all(options: list[list[Matcher]], p: _Peer) -> bool:
    """Whether every matcher of some option matches (options OR'ed, matchers AND'ed)."""
    for matchers in options:
        for m in matchers:
            if not m(p):
                break
        else:
            return True
    return False


class _Compiler:
    """Builds the matchers of one policy; errors name the policy and the field (`where`)."""

    def __init__(self, name: str, action: str) -> None:
        self.name = name
        self.namespace = name.partition("/")[0]
        self.action = action

    def fail(self, where: str, why: str) -> PolicyError:
        return PolicyError(f"authorization policy {self.name}: {where}: {why}")

    def strings(self, where: str, values: Any) -> list[str]:
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise self.fail(where, "must be a non-empty list of non-empty strings")
        for v in values:
            if v.count("*") > 1 or ("*" in v and not (v.startswith("*") or v.endswith("*"))):
                raise self.fail(where, f"wildcard only allowed once, at the start or end: {v!r}")
        return values

    def any_string(self, where: str, values: Any, get: Callable[[_Peer], str],
                   fold: bool = False) -> Matcher:
        values = self.strings(where, values)
        test = _strings([v.lower() for v in values] if fold else values)
        if fold:
            return lambda p: test(get(p).lower())
        return lambda p: test(get(p))

    def any_ip(self, where: str, values: Any) -> Matcher:
        nets = []
        for v in self.strings(where, values):
            try:
                net = ipaddress.ip_network(v, strict=False)
            except ValueError as exc:
                raise self.fail(where, f"bad IP address or CIDR {v!r}: {exc}") from None
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            nets.append((family, int(net.netmask), int(net.network_address)))

        def match(p: _Peer) -> bool:
            ip = p.ip
            if ip is None:
                return False
            family, value = ip
            for net_family, mask, network in nets:  # noqa: SIM110
                if net_family == family and value & mask == network:
                    return True
            return False
        return match

    def any_port(self, where: str, values: Any) -> Matcher:
        ports = set()
        for v in self.strings(where, values):
            if not v.isdigit() or int(v) > 65535:
                raise self.fail(where, f"bad port {v!r}: must be a number in 0..65535")
            ports.add(int(v))
        return lambda p: p.port in ports

    def any_account(self, where: str, values: Any) -> Matcher:
        """`ns/sa`, or `sa` in the policy's own namespace, compared exactly."""
        accounts = set()
        for v in self.strings(where, values):
            ns, _, sa = v.rpartition("/")
            accounts.add((ns or self.namespace, sa))
        return lambda p: p.identity[1:] in accounts

    def field(self, where: str, name: str, values: Any) -> Matcher:
        """The matcher of one source/operation field or condition, before any negation."""
        base = _positive(name)
        if base == "principals":
            return self.any_string(where, values, lambda p: p.principal)
        if base == "namespaces":
            return self.any_string(where, values, lambda p: p.identity[1])
        if base == "trustDomains":
            return self.any_string(where, values, lambda p: p.identity[0])
        if base == "serviceAccounts":
            return self.any_account(where, values)
        if base in ("ipBlocks", "remoteIpBlocks"):
            return self.any_ip(where, values)
        if base == "requestPrincipals":
            raise self.fail(where, "request principals need JWT authentication, which this proxy does not do")
        if base == "methods":
            return self.any_string(where, values, lambda p: p.method)
        if base == "paths":
            if isinstance(values, list) and any(isinstance(v, str) and "{" in v for v in values):
                raise self.fail(where, "path templates ({*}, {**}) are not supported")
            return self.any_string(where, values, lambda p: p.path)
        if base == "hosts":
            return self.any_string(where, values, lambda p: p.host, fold=True)
        if base == "ports":
            return self.any_port(where, values)
        raise self.fail(where, f"unknown field {name!r}")

    def fields(self, where: str, spec: Any, known: frozenset[str]) -> list[Matcher]:
        """A source's or operation's fields, to be ANDed (not* ones negated); unset ones left out."""
        if not isinstance(spec, dict):
            raise self.fail(where, "must be a mapping")
        matchers: list[Matcher] = []
        for name, values in spec.items():
            if name not in known:
                raise self.fail(f"{where}.{name}", "unknown field")
            if values is None or values == []:
                continue
            m = self.field(f"{where}.{name}", name, values)
            matchers.append((lambda p, m=m: not m(p)) if name.startswith("not") else m)
        return matchers

    def condition(self, where: str, cond: Any) -> tuple[Matcher, bool]:
        if not isinstance(cond, dict) or not isinstance(cond.get("key"), str):
            raise self.fail(where, "must be a mapping with a string `key`")
        key = cond["key"]
        values, not_values = cond.get("values"), cond.get("notValues")
        if not values and not not_values:
            raise self.fail(where, f"at least one of `values` or `notValues` must be set for key {key}")
        if key.startswith("request.headers[") and key.endswith("]") and len(key) > len("request.headers[]"):
            header = key[len("request.headers["):-1].lower()
            make: Callable[[str, Any], Matcher] = lambda w, v: self.any_string(  # noqa: E731
                w, v, lambda p: p.headers.get(header) or "")
            http = True
        elif key in ("source.ip", "remote.ip"):
            make, http = self.any_ip, False
        elif key == "source.namespace":
            make, http = (lambda w, v: self.any_string(w, v, lambda p: p.identity[1])), False
        elif key == "source.principal":
            make, http = (lambda w, v: self.any_string(w, v, lambda p: p.principal)), False
        elif key == "source.trustDomain":
            make, http = (lambda w, v: self.any_string(w, v, lambda p: p.identity[0])), False
        elif key == "source.serviceAccount":
            make, http = self.any_account, False
        elif key == "destination.port":
            make, http = self.any_port, False
        else:
            raise self.fail(f"{where}.key", f"condition key {key!r} is not supported by this proxy")
        pos = make(f"{where}.values", values) if values else None
        neg = make(f"{where}.notValues", not_values) if not_values else None
        if pos is not None and neg is not None:
            return (lambda p: pos(p) and not neg(p)), http
        if pos is not None:
            return pos, http
        assert neg is not None
        return (lambda p: not neg(p)), http

    def entries(self, where: str, entries: Any, inner: str) -> list[Any]:
        """The specs of a `from` or `to` list ([] when unset)."""
        if entries is None:
            return []
        if not isinstance(entries, list):
            raise self.fail(where, "must be a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {inner}:
                raise self.fail(f"{where}[{i}]", f"must be a mapping with `{inner}`")
        return [entry[inner] for entry in entries]

    def rule(self, where: str, rule: Any) -> Matcher:
        """One rule; for TCP (`_Peer.tcp`) its HTTP-only parts are left out, and an ALLOW rule
        that has any never matches."""
        if not isinstance(rule, dict):
            raise self.fail(where, "must be a mapping")
        unknown = set(rule) - _RULE_FIELDS
        if unknown:
            raise self.fail(where, f"unknown field {sorted(unknown)[0]!r}")
        sources = [self.fields(f"{where}.from[{i}].source", spec, _SOURCE_FIELDS)
                   for i, spec in enumerate(self.entries(f"{where}.from", rule.get("from"), "source"))]
        ops: list[list[Matcher]] = []
        tcp_ops: list[list[Matcher]] = []
        for i, spec in enumerate(self.entries(f"{where}.to", rule.get("to"), "operation")):
            at = f"{where}.to[{i}].operation"
            ops.append(self.fields(at, spec, _OPERATION_FIELDS))
            if isinstance(spec, dict):
                tcp_ops.append(self.fields(at, {k: v for k, v in spec.items() if not _is_http_field(k)},
                                           _OPERATION_FIELDS))
        conds: list[Matcher] = []
        tcp_conds: list[Matcher] = []
        when = rule.get("when")
        if when is not None and not isinstance(when, list):
            raise self.fail(f"{where}.when", "must be a list")
        for i, cond in enumerate(when or ()):
            m, http = self.condition(f"{where}.when[{i}]", cond)
            conds.append(m)
            if not http:
                tcp_conds.append(m)

        def match(p: _Peer) -> bool:
            if sources and not _any_all(sources, p):
                return False
            options = tcp_ops if p.tcp else ops
            if options and not _any_all(options, p):
                return False
            return _all(tcp_conds if p.tcp else conds, p)

        if self.action == ALLOW and _uses_http(rule):
            return lambda p: not p.tcp and match(p)
        return match


def _positive(name: str) -> str:
    """`notPaths` -> `paths`: the field a not* one negates."""
    return name[3].lower() + name[4:] if name.startswith("not") and name[3:4].isupper() else name


def _is_http_field(name: str) -> bool:
    return _positive(name) in _HTTP_FIELDS


def _uses_http(rule: dict[str, Any]) -> bool:
    """Whether a rule names an HTTP-only attribute (an operation's methods/paths/hosts or their
    not* forms, or a request.headers condition)."""
    for entry in rule.get("to") or ():
        if isinstance(entry, dict) and isinstance(entry.get("operation"), dict) and any(
                _is_http_field(k) and v for k, v in entry["operation"].items()):
            return True
    return any(isinstance(c, dict) and str(c.get("key", "")).startswith("request.headers[")
               for c in rule.get("when") or ())


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    match: Matcher


def _compile_policy(entry: Any) -> tuple[str, _Policy]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise PolicyError(f"authorization policy entry must be a mapping with a name, not {entry!r}")
    name = entry["name"]
    action = entry.get("action") or ALLOW
    if action == CUSTOM:
        provider = entry.get("provider") or "none"
        raise PolicyError(f"authorization policy {name}: action CUSTOM needs the external authorization "
                          f"provider {provider!r}, which this proxy cannot call")
    if action not in (ALLOW, DENY, AUDIT):
        raise PolicyError(f"authorization policy {name}: unknown action {action!r}")
    rules = entry.get("rules")
    if rules is not None and not isinstance(rules, list):
        raise PolicyError(f"authorization policy {name}: rules must be a list")
    c = _Compiler(name, action)
    matchers = [c.rule(f"rules[{i}]", r) for i, r in enumerate(rules or ())]

    def match(p: _Peer) -> bool:
        for m in matchers:  # noqa: SIM110
            if m(p):
                return True
        return False
    return action, _Policy(name, match)


class Authz:
    """The compiled policies of one config; immutable."""

    __slots__ = ("active", "allow", "audit", "deny")

    def __init__(self, deny: tuple[_Policy, ...] = (), allow: tuple[_Policy, ...] = (),
                 audit: tuple[_Policy, ...] = ()) -> None:
        self.deny = deny
        self.allow = allow
        self.audit = audit
        self.active = bool(deny or allow or audit)  # False: every check would allow, skip it

    def check_http(self, source_ip: str, principal: str, port: int, method: str, path: str, host: str,
                   headers: Mapping[str, str]) -> Decision:
        """A request to the workload's `port`; `path` is already normalised and may carry a query
        (it is ignored), header names in `headers` are lower case."""
        if not self.active:
            return ALLOWED
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        return self._decide(_Peer(source_ip, principal, port, method, path, host, headers))

    def check_tcp(self, source_ip: str, principal: str, port: int) -> Decision:
        """A connection to the workload's `port` carried at L4."""
        if not self.active:
            return ALLOWED
        return self._decide(_Peer(source_ip, principal, port, tcp=True))

    def _decide(self, peer: _Peer) -> Decision:
        audit = next((p.name for p in self.audit if p.match(peer)), "")
        for policy in self.deny:
            if policy.match(peer):
                return Decision(False, policy.name, audit)
        if not self.allow:
            return Decision(True, "", audit) if audit else ALLOWED
        for policy in self.allow:
            if policy.match(peer):
                return Decision(True, policy.name, audit)
        return Decision(False, "", audit)


ALLOW_ALL = Authz()


def compile_policies(entries: Any) -> Authz:
    """`security.authorization` of a proxy config (None or [] when absent) or raise PolicyError."""
    if not entries:
        return ALLOW_ALL
    if not isinstance(entries, list):
        raise PolicyError("security.authorization must be a list")
    by_action: dict[str, list[_Policy]] = {ALLOW: [], DENY: [], AUDIT: []}
    for entry in entries:
        action, policy = _compile_policy(entry)
        by_action[action].append(policy)
    return Authz(tuple(by_action[DENY]), tuple(by_action[ALLOW]), tuple(by_action[AUDIT]))
