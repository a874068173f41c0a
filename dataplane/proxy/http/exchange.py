"""The HTTP/1.1 connection rules of one proxied exchange, sans-IO: what the shell (server.py)
asks between reading and writing. Framing and keep-alive follow h11's `_body_framing` and
`_keep_alive` (RFC 9112 §6.3, §9.3) with a proxy's twists, as Envoy's codec has them:

* a client connection stays open after a response only if the client asked for it (its version
  default, `Connection`), its request was read whole (an unread body would be taken for the next
  request) and the proxy is not draining;
* a response body goes to the client as the upstream framed it when it had a Content-Length;
  otherwise (chunked, or read until the server's close) chunked to an HTTP/1.1 client, and
  delimited by our close for an HTTP/1.0 one; HEAD, 204 and 304 have no body whatever the fields
  say; a 101 (or a CONNECT 2xx) switches the connection to a tunnel;
* the forwarded heads lose their hop-by-hop fields (hopbyhop.py), Expect is answered here with
  a 100 Continue rather than forwarded, and x-forwarded-proto / x-request-id are added.

Plain functions over the codec's `Request`/`Response`: tests drive them without sockets
(tests/proxy/test_exchange.py). The per-request routing stages are filters.py's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dataplane.proxy.http import hopbyhop
from dataplane.proxy.http.codec import Data, EndOfMessage, HTTPError, Request, RequestParser, Response
from dataplane.proxy.http.serialize import status_line
from dataplane.proxy.routing import HeaderOps

# how a response body goes downstream
FRAME_AS_IS, FRAME_CHUNK, FRAME_RAW, FRAME_TUNNEL = 0, 1, 2, 3

_REQ_DROP = hopbyhop.REQUEST_DROP  # what a forwarded head never carries (hopbyhop.py says why)
_RESP_DROP = hopbyhop.RESPONSE_DROP
_CHUNKED = (b"transfer-encoding: chunked",)


class LocalReply(NamedTuple):
    """A response the proxy makes itself (a filter stops the request, no route, a fault...):
    the status, body and extra field lines, the response flags to record, and the stats key's route
    name and cluster."""

    status: int
    body: bytes = b""
    fields: tuple[bytes, ...] = ()
    flags: tuple[str, ...] = ()
    route: str = ""
    cluster: Any = None


def asks_switch(req: Request) -> bool:
    """Whether the response may switch protocols (an Upgrade request, or CONNECT)."""
    return req.upgrade is not None or req.method == b"CONNECT"


def wants_continue(req: Request) -> bool:
    """The client waits for a 100 before its body (Envoy answers it itself, never forwards Expect)."""
    return req.expect_continue and bool(req.content_length or req.chunked)


def keep_alive(req: Request, req_done: bool, draining: bool) -> bool:
    """Whether the client's connection may serve another request after this response."""
    return req.keep_alive and req_done and not draining


def connection_line(keep: bool, version: bytes) -> bytes | None:
    """The Connection field our response carries: close when we close, keep-alive to a 1.0 client
    that keeps the connection (its default is close), none otherwise."""
    if not keep:
        return b"connection: close"
    return b"connection: keep-alive" if version == b"1.0" else None


def framing(req: Request, resp: Response, keep: bool) -> tuple[int, bool, tuple[bytes, ...]]:
    """How the response body reaches the client: (FRAME_*, whether the connection stays open after
    it, the framing field lines to add)."""
    status = resp.status
    if status == 101 or (status < 300 and req.method == b"CONNECT"):
        if resp.upgrade is not None:
            return FRAME_TUNNEL, True, (b"connection: upgrade", b"upgrade: " + resp.upgrade)
        return FRAME_TUNNEL, True, (b"connection: upgrade",)
    if resp.content_length is not None:
        return FRAME_AS_IS, keep, ()
    if req.method == b"HEAD" or status == 204 or status == 304:
        return FRAME_AS_IS, keep, _CHUNKED if resp.chunked else ()
    if req.version == b"1.1":
        return FRAME_CHUNK, keep, _CHUNKED  # chunked upstream, or read-until-close: chunked for the client
    return FRAME_RAW, False, ()  # an HTTP/1.0 client: the end of the body is our close


def skip_body(parser: RequestParser) -> tuple[int, bool]:
    """Drop what is already buffered of a request body nobody will read (the request was answered
    locally): (bytes dropped, whether the body ended, so the connection may serve the next one)."""
    dropped = 0
    try:
        while True:
            ev = parser.next_event()
            if ev.__class__ is Data:
                dropped += len(ev.data)
            elif ev.__class__ is EndOfMessage:
                return dropped, True
            else:
                return dropped, False
    except HTTPError:
        return dropped, False


def local_reply(status: int, body: bytes, fields: tuple[bytes, ...] | list[bytes], keep: bool,
                version: bytes) -> bytes:
    """A whole response made by the proxy (Envoy's local reply): Content-Length framed, text/plain."""
    lines = [b"content-length: %d" % len(body)]
    if body:
        lines.append(b"content-type: text/plain")
    lines += fields
    conn = connection_line(keep, version)
    if conn is not None:
        lines.append(conn)
    return b"%s%s\r\n\r\n%s" % (status_line(status), b"\r\n".join(lines), body)


def forward_fields(req: Request, hdict: dict[bytes, bytes], ops: HeaderOps | None,
                   authority: bytes) -> list[bytes]:
    """The request's field lines as forwarded: hop-by-hop fields out (and the ones its Connection
    nominates, never framing or Host), the route's header operations applied, Host rewritten."""
    fields = req.headers
    if req.connection and hopbyhop.nominates(req.connection):
        drop = hopbyhop.drop_set(_REQ_DROP, req.connection)
        fields = [f for f in fields if f[0] not in drop]
    elif not _REQ_DROP.isdisjoint(hdict):
        fields = [f for f in fields if f[0] not in _REQ_DROP]
    if ops is not None:
        fields = ops.kept(fields)
    if authority is not req.host:
        fields = [f for f in fields if f[0] != b"host"]
        fields.append((b"host", authority))
    lines = [b": ".join(f) for f in fields]
    if ops is not None:
        lines += ops.add
    return lines


def forward_head(req: Request, lines: list[bytes], path: bytes) -> bytes:
    """The head sent upstream, from `forward_fields` plus the proxy's own lines: framing as the body
    will be sent (chunked stays chunked), Upgrade passed on explicitly."""
    if req.chunked:
        lines.append(b"transfer-encoding: chunked")
    if req.upgrade is not None:
        lines.append(b"connection: upgrade")
        lines.append(b"upgrade: " + req.upgrade)
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (req.method, path, b"\r\n".join(lines))


def response_fields(resp: Response, ops: HeaderOps | None) -> list[bytes]:
    """The response's field lines as the client gets them (before the proxy's own): hop-by-hop
    fields out, the route's response header operations applied."""
    drop = hopbyhop.drop_set(_RESP_DROP, resp.connection) \
        if resp.connection and hopbyhop.nominates(resp.connection) else _RESP_DROP
    fields = resp.headers
    if ops is None:
        return [b": ".join(f) for f in fields if f[0] not in drop]
    lines = [b": ".join(f) for f in ops.kept(fields) if f[0] not in drop]
    lines += ops.add
    return lines
