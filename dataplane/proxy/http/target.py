"""The request target as the sidecar routes, authorizes and forwards it, sans-IO.

Runs once per request, before authorization and routing (`normalize_request`):

* origin-form (`/path?query`): the path is normalised as meshConfig.pathNormalization says
  (pathnorm.py); the query goes on as received.
* absolute-form (`http://host[:port]/path?query`, RFC 9112 3.2.2): the target's authority wins
  over the Host header, which it replaces, and the request goes on in origin-form, so the policy
  and the route see the same path and host as the app. Only `http` is accepted: a sidecar never
  originates TLS because a target says `https`, and other schemes mean nothing to it. Userinfo
  (`http://user@host/`) is refused, as RFC 9110 4.2.4 deprecates it.
* authority-form only for CONNECT (left as is), asterisk-form (`*`) only for OPTIONS.

Anything else, a fragment (`#`, never part of a request target), `%00` or a malformed escape is a
400 (HTTPError), answered before the request is routed or authorized.
"""

from __future__ import annotations

import re

from dataplane.proxy.http import pathnorm
from dataplane.proxy.http.codec import HTTPError, Request

_NEEDS_WORK = re.compile(rb"[%\\#]|/[./]")  # an origin-form target without any of these is final
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")


def normalize_request(req: Request, mode: str) -> None:
    """Bring `req` (a parsed head) to the target the proxy uses from here on: `req.target` in
    origin-form with its path normalised, `req.host` and the Host field from an absolute-form
    target's authority. Raises HTTPError(400) for a target no mode may forward."""
    t = req.target
    if t[:1] == b"/":
        if _NEEDS_WORK.search(t) is not None:
            req.target = _origin(t, mode)
    elif req.method == b"CONNECT":
        return
    elif t == b"*":
        if req.method != b"OPTIONS":
            raise HTTPError(400, "asterisk-form target for a method other than OPTIONS")
    else:
        _absolute(req, t, mode)


def _origin(t: bytes, mode: str) -> bytes:
    if b"#" in t:
        raise HTTPError(400, "fragment in the request target")
    path, mark, query = t.partition(b"?")
    try:
        path = pathnorm.normalize(path, mode)
    except pathnorm.PathError as e:
        raise HTTPError(400, str(e)) from None
    return path + mark + query


def _absolute(req: Request, t: bytes, mode: str) -> None:
    m = _ABSOLUTE.fullmatch(t)
    if m is None:
        raise HTTPError(400, "request target is not origin-form or absolute-form")
    scheme, authority, rest = m.groups()
    if scheme.lower() != b"http":
        raise HTTPError(400, f"absolute-form target with scheme {scheme.decode('latin-1')!r}: only http")
    if b"@" in authority:
        raise HTTPError(400, "userinfo in the request target")
    if _AUTHORITY.fullmatch(authority) is None:
        raise HTTPError(400, "invalid authority in the request target")
    rest = rest if rest[:1] == b"/" else b"/" + rest
    req.target = _origin(rest, mode) if _NEEDS_WORK.search(rest) is not None else rest
    req.host = authority
    fields = [f for f in req.headers if f[0] != b"host"]
    fields.append((b"host", authority))
    req.headers = fields
