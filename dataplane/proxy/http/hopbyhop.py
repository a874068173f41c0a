"""Which fields a forwarded message loses, sans-IO: hop-by-hop fields, the ones its Connection
header nominates, and what may never travel in a trailer section.

RFC 9110 7.6.1 has a proxy drop the fields the Connection header names. Taken literally that lets
a client (or an upstream) strip the very fields the message is framed or routed by: with
`Connection: content-length` the head would go out without its length while the body still
follows, and the next hop would read that body as another request (request smuggling), or a
response as unframed (response-queue poisoning). So a nomination never removes a field in
`PROTECTED` (framing, routing, what the proxy itself reads or sets): the message keeps its framing
and its Host, as HAProxy and nginx keep them (they ignore nominations); every other nominated
field is dropped as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from dataplane.proxy import peer_metadata

# Connection tokens that name no field (they are options of the connection itself)
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Never removed because the Connection header names them: framing, routing, and the fields the
# proxy reads or sets itself (it would otherwise forward a request without them)
PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host", b"x-request-id",
                       b"x-forwarded-proto"})
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
                  b"upgrade", *peer_metadata.HEADERS})
# Request fields never forwarded as received: hop-by-hop ones, the framing we redo, what the proxy
# answers itself (Expect) or sets per try, and peers' metadata (never seen by apps or non-mesh clients).
REQUEST_DROP = _HOP | {b"expect", b"x-envoy-attempt-count", b"http2-settings"}
RESPONSE_DROP = _HOP
# RFC 9110 6.5.1: fields a recipient must not take from a trailer section (framing, routing,
# request modifiers, authentication, payload processing), plus the hop-by-hop ones
_NOT_TRAILERS = _HOP | {b"content-length", b"host", b"trailer", b"expect", b"max-forwards", b"cache-control",
                        b"authorization", b"proxy-authorization", b"www-authenticate", b"proxy-authenticate",
                        b"cookie", b"set-cookie", b"content-type", b"content-encoding", b"content-range",
                        b"x-request-id", b"x-envoy-attempt-count"}


@lru_cache(maxsize=256)
def drop_set(base: frozenset[bytes], tokens: tuple[bytes, ...]) -> frozenset[bytes]:
    """`base` plus the fields `tokens` (a message's Connection tokens) nominate, protected ones
    excepted (cached: a client sends the same Connection value request after request)."""
    return base.union(t for t in tokens if t not in PROTECTED and t not in CONNECTION_OPTIONS)


def nominates(tokens: tuple[bytes, ...]) -> bool:
    """Whether a Connection header's tokens name any field (the usual ones name none)."""
    return bool(tokens) and not CONNECTION_OPTIONS.issuperset(tokens)


def trailers(fields: Iterable[tuple[bytes, bytes]], tokens: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """The trailer fields worth forwarding: none that frames, routes, authenticates or is
    hop-by-hop (including what the message's Connection header nominated)."""
    drop = drop_set(_NOT_TRAILERS, tokens) if tokens else _NOT_TRAILERS
    return [f for f in fields if f[0] not in drop]
