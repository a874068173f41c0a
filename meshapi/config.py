"""The proxy config: what pilot sends each sidecar, and all the proxy reads (Envoy's LDS/RDS/CDS/EDS).

Pilot's translation (controlplane/pilot/networking) builds it; the proxy's runtime
(dataplane/proxy/runtime.py) compiles it. On the wire it stays plain dicts, lists, strings,
ints, floats and bools (JSON- and msgpack-safe), in a deterministic order; these TypedDicts
name its fields for both sides and for a type checker, and cost nothing at run time.

Durations are integer milliseconds (`*_ms`), percentages floats in [0, 100]. NotRequired keys
appear only when set; a match field that is absent matches anything. On the bus the config
travels as parts (meshapi/parts.py); `version` hashes them.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
PathNormalization = Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]
# Istio's Headers as written: {request?, response?: {set?, add?: {k: v}, remove?: [k]}}
HeaderOps = dict[str, Any]


class StringMatch(TypedDict, total=False):
    """Exactly one of exact | prefix | regex, or present: true."""
    exact: str
    prefix: str
    regex: str
    present: bool


class HttpOptions(TypedDict, total=False):
    """The HTTP connection manager's settings of a listener (dataplane/proxy/http/options.py);
    pilot sets upgrade_types ["websocket"], as Istio does."""
    request_headers_timeout_ms: int
    stream_idle_timeout_ms: int
    idle_timeout_ms: int
    upgrade_types: list[str]


class WeightedCluster(TypedDict):
    name: str
    weight: int
    headers: NotRequired[HeaderOps]


class TcpMatch(TypedDict, total=False):
    destination_subnets: list[str]
    sni_hosts: list[str]


class TcpRoute(TypedDict):
    match: TcpMatch
    clusters: list[WeightedCluster]


class OutboundListener(TypedDict):
    """One per visible service port. HTTP (and UNKNOWN, sniffed) ports have route_config (a key of
    `routes`) and http; non-HTTP (and UNKNOWN) ports tcp_routes: first match wins, the last always
    matches."""
    name: str                         # "<host>_<port>"
    service: str
    addresses: list[str]              # the service's VIPs
    port: int
    protocol: str
    route_config: NotRequired[str]
    http: NotRequired[HttpOptions]
    tcp_routes: NotRequired[list[TcpRoute]]


class InboundService(TypedDict):
    service: str
    port: int                         # the service port


class InboundListener(TypedDict):
    """One per port the proxy's own workload serves."""
    name: str                         # "inbound_<port>"
    port: int
    protocol: str
    mtls_mode: MtlsMode
    cluster: str                      # "inbound|<port>||"
    services: list[InboundService]
    http: NotRequired[HttpOptions]    # HTTP (and UNKNOWN) ports


class Listeners(TypedDict):
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"]
    outbound: list[OutboundListener]  # sorted by (port, service)
    inbound: list[InboundListener]


class RouteMatch(TypedDict, total=False):
    """Header names are lower-case; ignore_uri_case applies to uri exact/prefix."""
    uri: StringMatch
    scheme: StringMatch
    method: StringMatch
    authority: StringMatch
    headers: dict[str, StringMatch]
    query_params: dict[str, StringMatch]
    without_headers: dict[str, StringMatch]
    ignore_uri_case: bool


class Redirect(TypedDict, total=False):
    uri: str
    authority: str
    port: int
    scheme: str
    derive_port: str
    prefix_rewrite: str
    redirect_code: int


class DirectResponse(TypedDict):
    status: int
    body: NotRequired[str]


class Retries(TypedDict):
    attempts: int
    per_try_timeout_ms: int
    retry_on: list[str]
    retriable_status_codes: list[int]
    backoff_ms: NotRequired[int]


class UriRegexRewrite(TypedDict):
    match: str
    rewrite: str


class Rewrite(TypedDict, total=False):
    uri: str
    authority: str
    uri_regex: UriRegexRewrite


class Mirror(TypedDict):
    cluster: str
    percentage: float


class FaultDelay(TypedDict):
    fixed_delay_ms: int
    percentage: float


class FaultAbort(TypedDict, total=False):
    """http_status or grpc_status, and percentage."""
    http_status: int
    grpc_status: int
    percentage: float


class Fault(TypedDict, total=False):
    delay: FaultDelay
    abort: FaultAbort


class Route(TypedDict):
    """Then exactly one of clusters (weights sum to 100; PassthroughCluster forwards to the original
    destination), redirect, direct_response."""
    name: str
    match: RouteMatch
    virtual_service: NotRequired[str]  # "ns/name"
    clusters: NotRequired[list[WeightedCluster]]
    redirect: NotRequired[Redirect]
    direct_response: NotRequired[DirectResponse]
    timeout_ms: NotRequired[int]
    retries: NotRequired[Retries]
    rewrite: NotRequired[Rewrite]
    mirrors: NotRequired[list[Mirror]]
    fault: NotRequired[Fault]
    headers: NotRequired[HeaderOps]
    cors: NotRequired[dict[str, Any]]  # Istio's corsPolicy as written


class VirtualHost(TypedDict):
    name: str                         # "<host>:<port>"
    service: NotRequired[str]
    domains: list[str]                # exact Host/:authority values; "*" only in the last (fallback) host
    routes: list[Route]               # ordered; the first whose match fits wins


class RouteConfig(TypedDict):
    name: str
    virtual_hosts: list[VirtualHost]


class Cookie(TypedDict):
    name: str
    path: NotRequired[str]
    ttl_ms: NotRequired[int]


class ConsistentHash(TypedDict, total=False):
    """One of http_header_name | http_cookie | use_source_ip | http_query_parameter_name."""
    http_header_name: str
    http_cookie: Cookie
    use_source_ip: bool
    http_query_parameter_name: str
    minimum_ring_size: int
    maglev_table_size: int


class LoadBalancer(TypedDict, total=False):
    """simple (LEAST_REQUEST | ROUND_ROBIN | RANDOM | PASSTHROUGH) or consistent_hash."""
    simple: str
    consistent_hash: ConsistentHash


class TcpPool(TypedDict):
    connect_timeout_ms: int
    max_connections: NotRequired[int]
    max_connection_duration_ms: NotRequired[int]
    idle_timeout_ms: NotRequired[int]


class HttpPool(TypedDict, total=False):
    http1_max_pending_requests: int
    http2_max_requests: int
    max_requests_per_connection: int
    max_retries: int
    idle_timeout_ms: int


class ConnectionPool(TypedDict, total=False):
    tcp: TcpPool
    http: HttpPool


class OutlierDetection(TypedDict):
    """0 errors turn that check off."""
    consecutive_5xx_errors: int
    consecutive_gateway_errors: int
    interval_ms: int
    base_ejection_time_ms: int
    max_ejection_percent: float
    min_health_percent: float


class ClusterTls(TypedDict):
    """auto: Istio's auto mTLS: mTLS to endpoints whose tls_mode is "istio", plain text to the others."""
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
    sni: NotRequired[str]
    subject_alt_names: NotRequired[list[str]]
    client_certificate: NotRequired[str]
    private_key: NotRequired[str]
    ca_certificates: NotRequired[str]
    ca_crl: NotRequired[str]
    credential_name: NotRequired[str]
    insecure_skip_verify: NotRequired[bool]
    auto: NotRequired[bool]


class Cluster(TypedDict):
    """`outbound|<port>|<subset>|<host>` and `inbound|<port>||`, plus PassthroughCluster
    (ORIGINAL_DST) and BlackHoleCluster (no endpoints: fail the connection)."""
    name: str
    direction: Literal["outbound", "inbound"]
    type: Literal["EDS", "STRICT_DNS", "LOGICAL_DNS", "ORIGINAL_DST", "STATIC"]
    service: NotRequired[str]
    port: NotRequired[int]
    subset: NotRequired[str]
    protocol: NotRequired[str]
    subset_labels: NotRequired[dict[str, str]]
    destination_rule: NotRequired[str]  # "ns/name"
    lb: NotRequired[LoadBalancer]
    connection_pool: NotRequired[ConnectionPool]
    outlier_detection: NotRequired[OutlierDetection]
    tls: NotRequired[ClusterTls]


class Endpoint(TypedDict):
    address: str
    port: int
    weight: int
    locality: str
    healthy: bool
    labels: dict[str, str]
    service_account: str              # a SPIFFE id (meshapi/identity.py) or ""
    tls_mode: Literal["istio", "disabled"]


class Mtls(TypedDict):
    mode: MtlsMode
    ports: dict[str, MtlsMode]        # "<port>" -> mode


class AuthorizationPolicy(TypedDict):
    name: str                         # "ns/name"
    action: Literal["CUSTOM", "DENY", "ALLOW", "AUDIT"]
    rules: list[dict[str, Any]]       # Istio's rules as written
    provider: NotRequired[str]


class Security(TypedDict):
    mtls: Mtls
    authorization: list[AuthorizationPolicy]  # in evaluation order: CUSTOM, DENY, ALLOW, AUDIT
    # meshConfig.pathNormalization: how every request's path is normalised before authorization,
    # routing and forwarding (both directions)
    path_normalization: NotRequired[PathNormalization]


class ProxyConfig(TypedDict):
    version: str                      # hashes everything else (meshapi/parts.py)
    listeners: Listeners
    routes: dict[str, RouteConfig]    # "<port>" -> its route config
    clusters: dict[str, Cluster]      # sorted by name
    endpoints: dict[str, list[Endpoint]]  # every cluster but ORIGINAL_DST ones, in address order
    security: Security
