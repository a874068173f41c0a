"""The sidecar's metrics: Istio's standard metrics plus Envoy-style internal stats, sans-IO.

Recording must cost a few microseconds, so nothing here touches prometheus_client. A sidecar
knows its own labels once and its peer's per route or cluster, so the caller builds a `Key`
once per (peer, service, protocol, mTLS) with `Stats.request_key` and every request is then one
dict lookup plus list updates (`record_request`; `record_tcp`, `tcp_opened`, `tcp_closed` for
L4). Prometheus text is produced only when scraped. A peer known from Istio's metadata exchange
(peer_metadata.py) is put into such a Key by `with_peer`, cached by the caller per peer and Key.

Metrics and labels are Istio's (istio/proxy `istio_stats`): `istio_requests_total`,
`istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`,
`istio_tcp_{sent,received}_bytes_total` and `istio_tcp_connections_{opened,closed}_total`, with
LABELS (TCP metrics have no `response_code` or `grpc_response_status`). Label values follow
Istio's rules: a missing peer value is "unknown" ("latest" for a canonical revision), principals
are known only over mutual TLS, and `connection_security_policy` is "mutual_tls" or "none" when
the destination reports and "unknown" when the source does.

All three histograms use Envoy's default buckets (DEFAULT_BUCKETS), as Istio does: its bootstrap
sets no `histogram_bucket_settings` unless the `sidecar.istio.io/statsHistogramBuckets`
annotation asks, which `Stats(buckets=...)` mirrors. (Mixer-era Istio, before 1.5, used powers of
ten for the byte histograms.) A value equal to a bucket's upper bound counts in that bucket.

Internal stats (`inc`, `gauge_add`, `gauge_set`) are keyed by Envoy's stat name split into parts,
e.g. ("cluster", "outbound|9080||reviews.default.svc.cluster.local", "upstream_rq_total"). The
admin `/stats` page shows them as Envoy does ("cluster.<name>.upstream_rq_total: 3"); Prometheus
gets `envoy_cluster_upstream_rq_total{cluster_name="<name>"} 3`: a three-part name's middle part
becomes a label (TAG_NAMES, Envoy's tag names), other names are joined with "_". Envoy writes no
# HELP for them, which promtool flags; ours have one (ENVOY_COUNTERS, else one made from the name).

Every family the proxy keeps (Istio's and ENVOY_COUNTERS) is declared, # HELP and # TYPE, from the
start, so a scrape before the first request is a valid exposition and not 0 bytes; samples appear
with traffic, as in Envoy. Two names stay although promtool's lint warns, because dashboards and
alerts query them: Istio's `istio_request_duration_milliseconds` (base unit "seconds") and Envoy's
counters without "_total" (`envoy_cluster_upstream_rq_retry`, ...).

Worker processes: each worker owns a `Stats`. On a scrape the agent, which already merges the
app's and the proxy's metrics on 15020 as Istio's pilot-agent does, collects every worker's
`snapshot()` (plain lists, dicts, strings and numbers: msgpack- and JSON-safe) and serves
`merge(snapshots)`; `/stats` is `merge_admin(snapshots)`. Workers never read each other's state.
Counters and histograms are summed, and so are gauges, so gauges must be additive (active
connections, not "last config version"). A restarted worker starts from zero, which Prometheus
sees as a counter reset.

Snapshot layout, version 1:
  {"version": 1, "buckets": {histogram name: [upper bounds]},
   "requests": [[25 label values in LABELS order, [count, duration sum, request bytes sum,
                 response bytes sum, *duration bucket counts, *request bytes bucket counts,
                 *response bytes bucket counts]], ...]  (bucket counts are per bucket, +Inf last),
   "tcp": [[23 label values, [opened, closed, sent bytes, received bytes]], ...],
   "counters": [[[name parts], value], ...], "gauges": [[[name parts], value], ...]}
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

SOURCE = "source"  # reporter: the client's sidecar (outbound)
DESTINATION = "destination"  # reporter: the server's sidecar (inbound)
HTTP, GRPC, TCP = "http", "grpc", "tcp"
UNKNOWN = "unknown"
LATEST = "latest"

LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
    "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
)
_SRC_NS, _SRC_PRINCIPAL = LABELS.index("source_workload_namespace"), LABELS.index("source_principal")
_DST_NS = LABELS.index("destination_workload_namespace")
_DST_PRINCIPAL = LABELS.index("destination_principal")
_DST_SERVICE_NS = LABELS.index("destination_service_namespace")
# where a peer's workload goes in the head: (name, namespace, app, version, canonical service and
# revision, cluster) for each reporter; principals come from mutual TLS, not from metadata
_PEER_AT = {
    reporter: tuple(LABELS.index(f"{side}_{n}") for n in (
        "workload", "workload_namespace", "app", "version", "canonical_service", "canonical_revision",
        "cluster"))
    for reporter, side in ((DESTINATION, "source"), (SOURCE, "destination"))
}
TCP_LABELS: tuple[str, ...] = tuple(n for n in LABELS if n not in ("response_code", "grpc_response_status"))

REQUESTS_TOTAL = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"
HISTOGRAMS = (DURATION, REQUEST_BYTES, RESPONSE_BYTES)
TCP_COUNTERS = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total")
# Envoy's default histogram buckets (envoy.config.metrics.v3.StatsConfig.histogram_bucket_settings)
DEFAULT_BUCKETS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                                      60000, 300000, 600000, 1800000, 3600000)
HELP = {
    REQUESTS_TOTAL: "Requests handled by an Istio proxy.",
    DURATION: "Duration of requests in milliseconds.",
    REQUEST_BYTES: "HTTP request sizes in bytes.",
    RESPONSE_BYTES: "HTTP response sizes in bytes.",
    "istio_tcp_connections_opened_total": "TCP connections opened.",
    "istio_tcp_connections_closed_total": "TCP connections closed.",
    "istio_tcp_sent_bytes_total": "Bytes sent during response on TCP connections.",
    "istio_tcp_received_bytes_total": "Bytes received during request on TCP connections.",
}
# The Envoy stats the proxy counts, as Envoy names them in Prometheus, with what each counts
ENVOY_COUNTERS = {
    "envoy_cluster_upstream_cx_total": "Connections opened to the cluster's endpoints.",
    "envoy_cluster_upstream_cx_connect_fail": "Connections to the cluster's endpoints that failed.",
    "envoy_cluster_upstream_rq_pending_total": "Requests that waited for a pooled connection.",
    "envoy_cluster_upstream_rq_pending_overflow":
        "Requests failed at once because the cluster's pending-request limit was reached.",
    "envoy_cluster_upstream_rq_retry": "Request retries.",
    "envoy_cluster_upstream_rq_retry_overflow":
        "Retries not made because the cluster's retry limit was reached.",
    "envoy_cluster_upstream_rq_per_try_timeout": "Request attempts that hit the per-try timeout.",
    "envoy_cluster_upstream_rq_timeout": "Requests that timed out waiting for the upstream's response.",
}
# Envoy's tag for the middle part of a three-part internal stat name (Istio's bootstrap stats_tags)
TAG_NAMES = {"cluster": "cluster_name", "listener": "listener_address", "http": "http_conn_manager_prefix",
             "tcp": "tcp_prefix"}
SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Workload:
    """One end of a request, from Istio's node metadata: the sidecar itself, or its peer."""

    name: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN  # SPIFFE id; reported only when the connection is mutual TLS
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = LATEST
    cluster: str = UNKNOWN


class Key:
    """A label set without the per-request labels; compared by identity, so hashing is free."""

    __slots__ = ("head", "policy")

    def __init__(self, head: tuple[str, ...], policy: str) -> None:
        self.head = head  # LABELS from reporter to request_protocol
        self.policy = policy  # connection_security_policy

    def __repr__(self) -> str:
        return f"Key({dict(zip(LABELS, self.head, strict=False))}, policy={self.policy!r})"


class Stats:
    """One worker's metrics. Not thread-safe: a worker records from its own event loop."""

    def __init__(self, local: Workload, *, buckets: Mapping[str, Sequence[float]] | None = None) -> None:
        self.local = local
        self.buckets = {name: tuple(float(b) for b in (buckets or {}).get(name, DEFAULT_BUCKETS))
                        for name in HISTOGRAMS}
        for name, bounds in self.buckets.items():
            if list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
                raise ValueError(f"{name}: buckets must be finite and strictly increasing")
        # Sizes are ints and int-to-int comparisons make bisect twice as fast; durations are floats.
        self._dur = self.buckets[DURATION]
        self._reqb, self._respb = (tuple(int(b) if b.is_integer() else b for b in self.buckets[name])
                                   for name in (REQUEST_BYTES, RESPONSE_BYTES))
        self._req_at = 4 + len(self._dur) + 1
        self._resp_at = self._req_at + len(self._reqb) + 1
        self._width = self._resp_at + len(self._respb) + 1
        self._keys: dict[tuple, Key] = {}
        self._by_labels: dict[tuple, Key] = {}
        self._mtls_keys: dict[tuple[Key, str], Key] = {}
        self._requests: dict[tuple, list] = {}
        self._tcp: dict[tuple, list] = {}
        self.counters: dict[tuple[str, ...], int] = {}
        self.gauges: dict[tuple[str, ...], float] = {}

    def request_key(self, reporter: str, peer: Workload, *, service_host: str = "", service_name: str = "",
                    protocol: str = HTTP, mtls: bool = False) -> Key:
        """The key for traffic with `peer` (HTTP, gRPC or, with protocol=TCP, a connection).

        `service_host` is the destination service's FQDN (from the cluster, else the Host header);
        `service_name` defaults to its first label. `mtls`: the connection to the peer is mutual
        TLS. Equal label sets give the same Key; call once per route/cluster and peer, not per request.
        """
        args = (reporter, peer, service_host, service_name, protocol, mtls)
        key = self._keys.get(args)
        if key is None:
            key = self._keys[args] = self._make_key(*args)
        return key

    def _make_key(self, reporter: str, peer: Workload, service_host: str, service_name: str, protocol: str,
                  mtls: bool) -> Key:
        if reporter not in (SOURCE, DESTINATION):
            raise ValueError(f"reporter must be {SOURCE!r} or {DESTINATION!r}, not {reporter!r}")
        if protocol not in (HTTP, GRPC, TCP):
            raise ValueError(f"protocol must be http, grpc or tcp, not {protocol!r}")
        local = self.local
        service_name = service_name or service_host.partition(".")[0]
        peer_principal = peer.principal if mtls and peer.principal else UNKNOWN
        local_principal = local.principal if mtls and local.principal else UNKNOWN
        peer_ns = _san_namespace(peer_principal) or peer.namespace or UNKNOWN
        remote = (peer.name or UNKNOWN, peer_ns, peer_principal, peer.app or UNKNOWN, peer.version or UNKNOWN,
                  peer.canonical_service or UNKNOWN, peer.canonical_revision or LATEST)
        if reporter == SOURCE:
            src = (local.name, local.namespace, local_principal, local.app, local.version,
                   local.canonical_service, local.canonical_revision, local.cluster)
            dst = (*remote[:5], service_host or UNKNOWN, service_name or UNKNOWN, peer_ns, *remote[5:],
                   peer.cluster or UNKNOWN)
            policy = UNKNOWN
        else:
            src = (*remote, peer.cluster or UNKNOWN)
            dst = (local.name, local.namespace, local_principal, local.app, local.version,
                   service_host or local.canonical_service, service_name or local.canonical_service,
                   local.namespace, local.canonical_service, local.canonical_revision, local.cluster)
            both_known = peer_principal != UNKNOWN and local_principal != UNKNOWN
            policy = "mutual_tls" if both_known else "none"
        head = (reporter, *src, *dst, protocol)
        return self._by_labels.setdefault((head, policy), Key(head, policy))

    def mutual_tls(self, key: Key, peer_principal: str) -> Key:
        """`key` for traffic that came (destination reporter) or went (source reporter) over mutual TLS
        with the peer `peer_principal`: both principals set, the peer's namespace from its SPIFFE id,
        and connection_security_policy "mutual_tls" where the reporter tells it. Cached per pair."""
        k = (key, peer_principal)
        found = self._mtls_keys.get(k)
        if found is not None:
            return found
        head = list(key.head)
        local = self.local.principal or UNKNOWN
        peer_ns = _san_namespace(peer_principal)
        if head[0] == SOURCE:
            head[_SRC_PRINCIPAL], head[_DST_PRINCIPAL] = local, peer_principal
            if peer_ns:
                head[_DST_NS] = head[_DST_SERVICE_NS] = peer_ns
            policy = key.policy
        else:
            head[_SRC_PRINCIPAL], head[_DST_PRINCIPAL] = peer_principal, local
            if peer_ns:
                head[_SRC_NS] = peer_ns
            policy = "mutual_tls" if local != UNKNOWN else "none"
        labels = tuple(head)
        found = self._mtls_keys[k] = self._by_labels.setdefault((labels, policy), Key(labels, policy))
        return found

    def with_peer(self, key: Key, peer: Workload) -> Key:
        """`key` with the peer's workload labels from metadata exchange (peer_metadata.py): `source_*`
        for the destination reporter, `destination_*` for the source one. Not cached here: the
        caller keeps one result per (peer, key)."""
        head = list(key.head)
        values = (peer.name or UNKNOWN, peer.namespace or UNKNOWN, peer.app or UNKNOWN,
                  peer.version or UNKNOWN, peer.canonical_service or UNKNOWN,
                  peer.canonical_revision or LATEST, peer.cluster or UNKNOWN)
        for i, value in zip(_PEER_AT[head[0]], values, strict=True):
            head[i] = value
        if head[0] == SOURCE and head[_DST_SERVICE_NS] == UNKNOWN:
            head[_DST_SERVICE_NS] = head[_DST_NS]
        labels = tuple(head)
        return self._by_labels.setdefault((labels, key.policy), Key(labels, key.policy))

    def record_request(self, key: Key, code: int, flags: str, duration_ms: float, request_bytes: int,
                       response_bytes: int, grpc_status: int | None = None) -> None:
        """Count one finished HTTP/gRPC request. `flags` as in dataplane.proxy.flags ("-" for none)."""
        series = self._requests.get((key, code, flags, grpc_status))
        if series is None:
            series = self._requests[(key, code, flags, grpc_status)] = [0] * self._width
        series[0] += 1
        series[1] += duration_ms
        series[2] += request_bytes
        series[3] += response_bytes
        series[4 + bisect_left(self._dur, duration_ms)] += 1
        series[self._req_at + bisect_left(self._reqb, request_bytes)] += 1
        series[self._resp_at + bisect_left(self._respb, response_bytes)] += 1

    def tcp_opened(self, key: Key, flags: str = "-") -> None:
        self._tcp_series(key, flags)[0] += 1

    def tcp_closed(self, key: Key, flags: str = "-") -> None:
        self._tcp_series(key, flags)[1] += 1

    def record_tcp(self, key: Key, sent: int, received: int, flags: str = "-") -> None:
        """Add bytes moved since the last call; call on close and, for long connections, periodically."""
        series = self._tcp_series(key, flags)
        series[2] += sent
        series[3] += received

    def _tcp_series(self, key: Key, flags: str) -> list:
        series = self._tcp.get((key, flags))
        if series is None:
            series = self._tcp[(key, flags)] = [0, 0, 0, 0]
        return series

    def inc(self, name: tuple[str, ...], n: int = 1) -> None:
        """Add to an internal counter, e.g. ("cluster", cluster, "upstream_rq_total")."""
        self.counters[name] = self.counters.get(name, 0) + n

    def gauge_add(self, name: tuple[str, ...], delta: float) -> None:
        self.gauges[name] = self.gauges.get(name, 0) + delta

    def gauge_set(self, name: tuple[str, ...], value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, Any]:
        """This worker's state as plain data (layout in the module docstring), for `merge`."""
        return {
            "version": SNAPSHOT_VERSION,
            "buckets": {name: list(bounds) for name, bounds in self.buckets.items()},
            "requests": [[[*key.head, str(code), "" if grpc is None else str(grpc), flags, key.policy],
                          list(values)] for (key, code, flags, grpc), values in self._requests.items()],
            "tcp": [[[*key.head, flags, key.policy], list(values)]
                    for (key, flags), values in self._tcp.items()],
            "counters": [[list(name), value] for name, value in self.counters.items()],
            "gauges": [[list(name), value] for name, value in self.gauges.items()],
        }

    def render(self) -> str:
        """Prometheus text for this worker alone."""
        return merge([self.snapshot()])

    def render_admin(self) -> str:
        """The admin /stats page for this worker alone."""
        return merge_admin([self.snapshot()])


def merge(snapshots: Iterable[Mapping[str, Any]]) -> str:
    """Sum workers' snapshots and render Prometheus text (format 0.0.4); every family the proxy
    keeps is declared even before it has a sample."""
    m = _Merged(snapshots)
    out: list[str] = []
    series = sorted((_labels(LABELS, labels), values) for labels, values in m.requests.items())
    _family(out, REQUESTS_TOTAL, "counter", HELP[REQUESTS_TOTAL])
    out.extend(f"{REQUESTS_TOTAL}{{{lbl}}} {_num(v[0])}\n" for lbl, v in series)
    at = 4
    for i, name in enumerate(HISTOGRAMS):
        les = [*(_num(b) for b in m.buckets.get(name, DEFAULT_BUCKETS)), "+Inf"]
        _family(out, name, "histogram", HELP[name])
        for lbl, v in series:
            total = 0
            for le, n in zip(les, v[at:at + len(les)], strict=True):
                total += n
                out.append(f'{name}_bucket{{{lbl},le="{le}"}} {total}\n')
            out.append(f"{name}_sum{{{lbl}}} {_num(v[1 + i])}\n{name}_count{{{lbl}}} {v[0]}\n")
        at += len(les)
    series = sorted((_labels(TCP_LABELS, labels), values) for labels, values in m.tcp.items())
    for i, name in enumerate(TCP_COUNTERS):
        _family(out, name, "counter", HELP[name])
        out.extend(f"{name}{{{lbl}}} {_num(v[i])}\n" for lbl, v in series)
    for kind, values, known in (("counter", m.counters, ENVOY_COUNTERS), ("gauge", m.gauges, {})):
        families: dict[str, tuple[str, list[str]]] = {prom: (text, []) for prom, text in known.items()}
        for name, value in sorted(values.items()):
            prom, lbl = _prometheus_name(name)
            lines = families.setdefault(prom, (_stat_help(name), []))[1]
            lines.append(f"{prom}{{{lbl}}} {_num(value)}\n" if lbl else f"{prom} {_num(value)}\n")
        for prom, (text, lines) in sorted(families.items()):
            _family(out, prom, kind, text)
            out.extend(lines)
    return "".join(out)


def merge_admin(snapshots: Iterable[Mapping[str, Any]]) -> str:
    """Sum workers' internal stats and render Envoy's admin /stats text: "name: value" lines, sorted."""
    m = _Merged(snapshots)
    stats = (*m.counters.items(), *m.gauges.items())
    lines = sorted(f"{'.'.join(name)}: {_num(value)}\n" for name, value in stats)
    return "".join(lines)


class _Merged:
    """Snapshots summed series by series; histogram buckets must agree."""

    def __init__(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        self.buckets: dict[str, tuple[float, ...]] = {}
        self.requests: dict[tuple, list] = {}
        self.tcp: dict[tuple, list] = {}
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        for snap in snapshots:
            if snap.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"unsupported stats snapshot version {snap.get('version')!r}")
            buckets = {name: tuple(bounds) for name, bounds in snap["buckets"].items()}
            if self.buckets and buckets != self.buckets:
                raise ValueError("workers' histogram buckets differ")
            self.buckets = buckets
            for target, rows in ((self.requests, snap["requests"]), (self.tcp, snap["tcp"])):
                for labels, values in rows:
                    have = target.get(tuple(labels))
                    if have is None:
                        target[tuple(labels)] = list(values)
                    else:
                        have[:] = [a + b for a, b in zip(have, values, strict=True)]
            for target, rows in ((self.counters, snap["counters"]), (self.gauges, snap["gauges"])):
                for name, value in rows:
                    target[tuple(name)] = target.get(tuple(name), 0) + value


def _family(out: list[str], name: str, kind: str, text: str) -> None:
    out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")


def _stat_help(name: tuple[str, ...]) -> str:
    """HELP for an Envoy stat without one in ENVOY_COUNTERS: its admin /stats name."""
    if len(name) == 3:
        return f"Envoy stat {name[0]}.<{TAG_NAMES.get(name[0], name[0] + '_name')}>.{name[2]}."
    return f"Envoy stat {'.'.join(name)}."


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


def _escape(value: str) -> str:
    """Escape a label value; lone surrogates (undecodable header bytes) become U+FFFD so it encodes."""
    if not value.isascii():
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_NOT_NAME = re.compile(r"[^a-zA-Z0-9_:]")


def _prometheus_name(name: tuple[str, ...]) -> tuple[str, str]:
    """Envoy's Prometheus name and label for an internal stat name (see the module docstring)."""
    if len(name) == 3:
        scope, tag, stat = name
        label = f'{TAG_NAMES.get(scope, scope + "_name")}="{_escape(tag)}"'
        return _NOT_NAME.sub("_", f"envoy_{scope}_{stat}"), label
    return _NOT_NAME.sub("_", "envoy_" + "_".join(name)), ""


def _san_namespace(principal: str) -> str:
    """The namespace in a SPIFFE id ".../ns/<namespace>/sa/...", as Istio prefers it over metadata."""
    _, found, rest = principal.partition("/ns/")
    return rest.partition("/")[0] if found else ""


def _num(value: float) -> str:
    """A sample or bound as Go's strconv 'g' prints it (what Envoy and Prometheus write): 1, 0.5, 1.8e+06."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "NaN" if value != value else ("+Inf" if value > 0 else "-Inf")
    if value == 0:
        return "0"
    digits = Decimal(repr(value)).normalize()
    exp = digits.adjusted()
    ndigits = len(digits.as_tuple().digits)
    if exp < -4 or exp >= 6:
        return f"{value:.{ndigits - 1}e}"
    return f"{value:.{max(ndigits - 1 - exp, 0)}f}"
