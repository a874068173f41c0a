"""HTTP/1.1 for the sidecar proxy: the sans-IO codec (see `codec` and `serialize`)."""

from dataplane.proxy.http.codec import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Data,
    EndOfMessage,
    Event,
    HTTPError,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    TunnelData,
)
from dataplane.proxy.http.serialize import (
    CONTINUE,
    LAST_CHUNK,
    chunk,
    error_response,
    last_chunk,
    request_head,
    response_head,
    valid_field,
)

__all__ = [
    "CLOSED",
    "CONTINUE",
    "LAST_CHUNK",
    "NEED_DATA",
    "PAUSED",
    "Data",
    "EndOfMessage",
    "Event",
    "HTTPError",
    "Request",
    "RequestParser",
    "Response",
    "ResponseParser",
    "TunnelData",
    "chunk",
    "error_response",
    "last_chunk",
    "request_head",
    "response_head",
    "valid_field",
]
