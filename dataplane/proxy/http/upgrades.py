"""Which protocol switches the sidecar lets through, as Envoy's HTTP connection manager decides them
with Istio's `upgrade_configs` (websocket only, by default).

A request's Upgrade value (the whole value, without case) or CONNECT is one of:

* FORWARD: an allowed type (`HttpOptions.upgrade_types`; "connect" for CONNECT). The request is
  authorized and routed like any other, and a 101 (CONNECT: a 2xx) makes a tunnel.
* STRIP: `h2c`, never tunnelled (h2c smuggling: the app would speak HTTP/2 through a tunnel the
  proxy no longer inspects). Envoy drops the Upgrade and forwards a plain HTTP/1.1 request; so
  does zmesh.
* REFUSE: any other type, and CONNECT unless allowed: 403 with no body (Envoy's
  `upgrade_failed`); the connection stays usable for the next request.

Whatever the request asked, a 101 from the upstream to a request not forwarded as an upgrade is
an upstream protocol error (502, flag UPE, the upstream connection closed): the app must not
switch protocols under the proxy's feet.
"""

from __future__ import annotations

import dataclasses

from dataplane.proxy.http.codec import Request, RequestParser

FORWARD, STRIP, REFUSE = 0, 1, 2
_H2C = b"h2c"
_CONNECT = b"connect"


def verdict(method: bytes, upgrade: bytes | None, allowed: frozenset[bytes]) -> int:
    """FORWARD, STRIP or REFUSE for a request with this method and Upgrade value (None: no upgrade)."""
    if method == b"CONNECT":
        return FORWARD if _CONNECT in allowed else REFUSE
    if upgrade is None:
        return FORWARD
    kind = upgrade.strip().lower()
    if kind == _H2C:
        return STRIP
    return FORWARD if kind in allowed else REFUSE


def stripped(req: Request, parser: RequestParser) -> Request:
    """`req` as a plain request (its Upgrade is not forwarded), and `parser` told not to pause after it."""
    parser.decline_upgrade()
    return dataclasses.replace(req, upgrade=None)

