"""Envoy's response flags: the short codes in access logs and in Istio's `response_flags` label.

The codes and their order are Envoy's (`StreamInfo::ResponseFlagUtils::CORE_RESPONSE_FLAGS`), so
dashboards and alerts written against Istio read zmesh's logs and metrics unchanged. Several flags
on one request are joined with "," in ORDER; none is "-".
"""

from __future__ import annotations

from collections.abc import Iterable

NONE = "-"  # no flag: the upstream's own response was passed on
LH = "LH"  # local service failed its health check (503)
UH = "UH"  # no healthy upstream host in the cluster (503)
UT = "UT"  # upstream request timeout (504)
LR = "LR"  # connection reset locally (503)
UR = "UR"  # upstream reset the stream / connection remotely (503)
UF = "UF"  # upstream connection failure (503)
UC = "UC"  # upstream connection terminated (503)
UO = "UO"  # upstream overflow: circuit breaker open (503)
NR = "NR"  # no route for the request (404), or no filter chain for a connection
DI = "DI"  # request delayed by fault injection
FI = "FI"  # request aborted by fault injection
RL = "RL"  # rate limited locally (429)
UAEX = "UAEX"  # denied by the external authorization service
RLSE = "RLSE"  # rejected because the rate limit service errored
DC = "DC"  # downstream connection terminated
URX = "URX"  # retry limit (HTTP) or connect attempt limit (TCP) reached
SI = "SI"  # stream idle timeout (408 or 504)
IH = "IH"  # invalid value in a strictly checked x-envoy-* header (400)
DPE = "DPE"  # downstream HTTP protocol error
UMSDR = "UMSDR"  # upstream request reached its max stream duration
RFCF = "RFCF"  # response served from the cache filter
NFCF = "NFCF"  # no config found for a dynamically configured filter
DT = "DT"  # request or connection exceeded its max (downstream) connection duration
UPE = "UPE"  # upstream HTTP protocol error
NC = "NC"  # upstream cluster not found
OM = "OM"  # terminated by the overload manager
DF = "DF"  # DNS resolution of the upstream failed
DO = "DO"  # dropped by the cluster's drop_overload
DR = "DR"  # downstream reset the stream remotely
RBAC = "RBAC"  # denied by an AuthorizationPolicy (403 "RBAC: access denied", or the connection closed)

ORDER: tuple[str, ...] = (LH, UH, UT, LR, UR, UF, UC, UO, NR, DI, FI, RL, UAEX, RLSE, DC, URX, SI, IH,
                          DPE, UMSDR, RFCF, NFCF, DT, UPE, NC, OM, DF, DO, DR, RBAC)
_RANK = {flag: i for i, flag in enumerate(ORDER)}


def join(flags: Iterable[str]) -> str:
    """The label/log value for a set of flags, in Envoy's order, so one set always reads the same."""
    return ",".join(sorted(set(flags), key=_RANK.__getitem__)) or NONE
