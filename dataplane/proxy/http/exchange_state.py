"""The state of one HTTP/1.1 exchange on a downstream connection, as a table-driven machine (sans-IO).

Modelled on h11's connection state (our own code): two roles, CLIENT (the request the proxy reads)
and SERVER (the response the proxy writes, relayed from an upstream or made locally), each in one
of the states below. The I/O shell (server.py, forward.py) tells the machine what happened
(`Exchange.event`), and asks it what may happen next: start the next request, reuse the upstream
connection, or close. An event the current states do not allow raises `LocalProtocolError`, which
the shell answers with 400 (the client's fault) or 502 (the upstream's), then closes.

Two kinds of transitions, as in h11:

* event-triggered, per role (`CLIENT_EVENTS`, `SERVER_EVENTS`): REQUEST moves the client
  IDLE -> SEND_BODY, REQUEST_END -> DONE; RESPONSE (or RESPONSE_CLOSE, when the connection closes
  after it) moves the server SEND_RESPONSE -> SEND_BODY, RESPONSE_END -> DONE; SWITCH (a 101 to an
  Upgrade, a 2xx to CONNECT) -> SWITCHED_PROTOCOL; *_ERROR -> ERROR from anywhere;
* state-triggered, over both roles and two flags (`_settle`): a request leaves the server IDLE
  for SEND_RESPONSE; a pending switch proposal (PROPOSE) parks a finished client in MIGHT_SWITCH
  until the server accepts it (both SWITCHED_PROTOCOL) or answers otherwise (back to DONE); once
  the connection may not be kept alive, DONE becomes MUST_CLOSE; when one side must close (or
  failed, or the client closed) the other does too; and, a proxy's twist on h11, a response that
  ends while the request body is still coming closes the connection (the proxy does not wait for
  a body it will not forward). Both DONE: NEXT_CYCLE starts the next request (pipelined or not).

Speed (this runs per request on the hot path): states and events are small ints; every reachable
combination of (client state, server state, flags) is compiled once, at import, into a row, a dict
from event to the next (client, server, flags, row) tuple, so an event costs one dict lookup, one
tuple unpack and no allocation. Tests: tests/proxy/test_exchange_state.py.
"""

from __future__ import annotations

from dataplane.proxy.http.codec import HTTPError

# roles
CLIENT, SERVER = 0, 1

# states (SEND_RESPONSE is the server's only; MIGHT_SWITCH the client's only)
IDLE, SEND_RESPONSE, SEND_BODY, DONE, MIGHT_SWITCH, SWITCHED, MUST_CLOSE, CLOSED, ERROR = range(9)
STATE_NAMES = ("IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE", "MIGHT_SWITCH_PROTOCOL", "SWITCHED_PROTOCOL",
               "MUST_CLOSE", "CLOSED", "ERROR")

# events: the client's ...
REQUEST = 0  # a request head was read
PROPOSE = 1  # the request, as forwarded, asks to switch protocols (Upgrade, CONNECT)
REQUEST_END = 2  # the request's body ended
CLIENT_CLOSED = 3  # the client closed its side between requests
CLIENT_ERROR = 4  # the client's bytes are not HTTP (or it stalled mid-head)
# ... the server's (the response to the client) ...
INFORMATIONAL = 5  # a 1xx (the proxy's own 100 Continue)
RESPONSE = 6  # a final response head; the connection may be kept alive after it
RESPONSE_CLOSE = 7  # a final response head after which the connection closes
SWITCH = 8  # a 101 to an Upgrade, a 2xx to CONNECT: the connection becomes a tunnel
RESPONSE_END = 9  # the response's body ended
SERVER_ERROR = 10  # the response cannot be completed
# ... and the connection's
NEXT_CYCLE = 11  # both done: ready for the next request
EVENT_NAMES = ("REQUEST", "PROPOSE", "REQUEST_END", "CLIENT_CLOSED", "CLIENT_ERROR", "INFORMATIONAL",
               "RESPONSE", "RESPONSE_CLOSE", "SWITCH", "RESPONSE_END", "SERVER_ERROR", "NEXT_CYCLE")

# flags
KEEP = 1  # the connection may serve another request after this exchange
PROPOSAL = 2  # a protocol switch was proposed and not yet answered

# event-triggered transitions: role -> state -> event -> next state
CLIENT_EVENTS: dict[int, dict[int, int]] = {
    IDLE: {REQUEST: SEND_BODY, CLIENT_CLOSED: CLOSED},
    SEND_BODY: {PROPOSE: SEND_BODY, REQUEST_END: DONE},  # REQUEST, PROPOSE: see _step's conditions
    DONE: {PROPOSE: DONE, CLIENT_CLOSED: CLOSED},  # PROPOSE after the end: a fault delay came first
    MUST_CLOSE: {CLIENT_CLOSED: CLOSED},
    CLOSED: {CLIENT_CLOSED: CLOSED},
}
SERVER_EVENTS: dict[int, dict[int, int]] = {
    IDLE: {RESPONSE_CLOSE: SEND_BODY},  # the answer to a head that never made a request (400, 408)
    SEND_RESPONSE: {INFORMATIONAL: SEND_RESPONSE, RESPONSE: SEND_BODY, RESPONSE_CLOSE: SEND_BODY,
                    SWITCH: SWITCHED},  # SWITCH: only while the client waits in MIGHT_SWITCH
    SEND_BODY: {RESPONSE_END: DONE},
}
_CLIENT_EVS = (REQUEST, PROPOSE, REQUEST_END, CLIENT_CLOSED)
_SERVER_EVS = (INFORMATIONAL, RESPONSE, RESPONSE_CLOSE, SWITCH, RESPONSE_END)
_ENDED = (MUST_CLOSE, CLOSED, ERROR)


class LocalProtocolError(HTTPError):
    """An event the exchange's states do not allow; `status` is what the shell answers (400: the
    client broke the protocol, 502: the upstream did) before it closes."""


def _settle(client: int, server: int, flags: int) -> tuple[int, int, int]:
    """The state-triggered transitions, applied until none applies (see the module docstring)."""
    while True:
        before = (client, server, flags)
        if server == IDLE and client in (SEND_BODY, DONE, MIGHT_SWITCH):
            server = SEND_RESPONSE
        if flags & PROPOSAL and client == DONE:
            client = MIGHT_SWITCH
        if not flags & PROPOSAL and client == MIGHT_SWITCH:
            client = DONE  # the proposal was answered without a switch
        if server == SWITCHED and client == MIGHT_SWITCH:
            client = SWITCHED
        if server == DONE and client == SEND_BODY:
            server = MUST_CLOSE  # the response is over and the rest of the request would be unread
        if not flags & KEEP:
            client = MUST_CLOSE if client == DONE else client
            server = MUST_CLOSE if server == DONE else server
        if server in _ENDED and client in (IDLE, DONE, MIGHT_SWITCH):
            client = MUST_CLOSE  # (a client still sending its body stays in SEND_BODY: never read)
        if (client == CLOSED and server in (IDLE, DONE)) or (client == ERROR and server == DONE):
            server = MUST_CLOSE
        if (client, server, flags) == before:
            return before


def _step(client: int, server: int, flags: int, ev: int) -> tuple[int, int, int] | None:
    """The event-triggered transition of `ev` from these states (None: not allowed), settled."""
    if ev == CLIENT_ERROR:
        return _settle(ERROR, server, flags & ~PROPOSAL)
    if ev == SERVER_ERROR:
        return _settle(client, ERROR, flags & ~PROPOSAL)
    if ev == NEXT_CYCLE:
        return (IDLE, IDLE, KEEP) if client == DONE and server == DONE else None
    if ev in _CLIENT_EVS:
        nxt = CLIENT_EVENTS.get(client, {}).get(ev)
        if nxt is None or (ev == REQUEST and server != IDLE) or (ev == PROPOSE and server != SEND_RESPONSE):
            return None  # a request only on an idle connection; a proposal only before the response
        if ev == PROPOSE:
            flags |= PROPOSAL
        return _settle(nxt, server, flags)
    nxt = SERVER_EVENTS.get(server, {}).get(ev)
    if nxt is None or (ev == SWITCH and client != MIGHT_SWITCH):
        return None
    if ev == RESPONSE_CLOSE:
        flags &= ~KEEP
    if ev in (RESPONSE, RESPONSE_CLOSE):
        flags &= ~PROPOSAL  # a final response that is not a switch refuses the proposal
    return _settle(client, nxt, flags)


Node = tuple[int, int, int, dict]


def _compile() -> tuple[Node, dict[tuple[int, int, int], Node]]:
    """Every (client, server, flags) reachable from the start, each with its row: event -> next node."""
    start = (IDLE, IDLE, KEEP)
    nodes: dict[tuple[int, int, int], Node] = {}
    todo = [start]
    while todo:
        key = todo.pop()
        if key in nodes:
            continue
        nodes[key] = (*key, {})
        for ev in range(len(EVENT_NAMES)):
            nxt = _step(*key, ev)
            if nxt is not None and nxt not in nodes:
                todo.append(nxt)
    for key, node in nodes.items():
        row = node[3]
        for ev in range(len(EVENT_NAMES)):
            nxt = _step(*key, ev)
            if nxt is not None:
                row[ev] = nodes[nxt]
    return nodes[start], nodes


_START, TABLE = _compile()


class Exchange:
    """The states of the current exchange on one connection. `client`, `server` (states) and
    `flags` (KEEP, PROPOSAL) are read directly by the shell; only `event` changes them."""

    __slots__ = ("_row", "client", "flags", "server")

    def __init__(self) -> None:
        self.client, self.server, self.flags, self._row = _START

    def event(self, ev: int) -> None:
        """Apply `ev`; LocalProtocolError (the states unchanged) when the current states refuse it."""
        nxt = self._row.get(ev)
        if nxt is None:
            raise self.refusal(ev)
        self.client, self.server, self.flags, self._row = nxt

    def refusal(self, ev: int) -> LocalProtocolError:
        """The error for `ev` refused in the current states: 502 for a server event (the upstream's
        response), 400 for the client's."""
        status = 400 if ev in _CLIENT_EVS or ev == CLIENT_ERROR else 502
        return LocalProtocolError(status, f"{EVENT_NAMES[ev]} not allowed with client "
                                          f"{STATE_NAMES[self.client]}, server {STATE_NAMES[self.server]}")

    def next_cycle(self) -> bool:
        """Start the next exchange if both sides are done and the connection stays open (the next
        request, pipelined or not, may start); False when the connection must close instead."""
        nxt = self._row.get(NEXT_CYCLE)
        if nxt is None:
            return False
        self.client, self.server, self.flags, self._row = nxt
        return True

    def refuse_head(self) -> None:
        """A head that never made a request (malformed, or stalled) is answered, and the connection
        closes after the answer."""
        self.event(CLIENT_ERROR)
        self.event(RESPONSE_CLOSE)
        self.event(RESPONSE_END)

    def must_close(self) -> bool:
        """The connection closes once what is queued for the client is written."""
        return self.server >= MUST_CLOSE

    def request_complete(self) -> bool:
        """The whole request was read (so its upstream connection may be reused after the response)."""
        return DONE <= self.client <= CLOSED
