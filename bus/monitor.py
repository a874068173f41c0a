"""Socket monitors: connected peers, and handshakes that fail (wrong server key, refused key, garbage).

A CURVE client given the wrong server key sees HANDSHAKE_FAILED_PROTOCOL on every
reconnect; one refused by ZAP sees HANDSHAKE_FAILED_AUTH. Both are counted, logged
once per burst and exposed as `last_error`, so the failure is never silent.
Which connections count as peers is `bus.peers.PeerLedger`'s business: only handshaken ones, so
bytes that are not ZeroMQ, or a refused handshake, never move the peers gauge.
"""

from __future__ import annotations

import contextlib
import uuid

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.logs import BurstLog, Log
from bus.loop import Loop
from bus.metrics import AUTH_FAILURES, CONNECTED_PEERS, HANDSHAKE_FAILURES, PEER_DISCONNECTS
from bus.peers import Ending, PeerLedger

_OPENED = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED
_ENDED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | _OPENED | _ENDED)
# Which failure events mean what, per side. A client given the wrong server key sees
# NO_DETAIL (the server just hangs up); the server sees PROTOCOL (it cannot open the HELLO).
_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}
_EXPLAIN = {
    ("client", "handshake_protocol"): "CURVE handshake failed: wrong server public key?",
    ("client", "handshake_failed"): "CURVE handshake failed: wrong server public key?",
    ("client", "handshake_refused"): "server refused our CURVE key (not on its allow-list)",
    ("server", "handshake_protocol"): "a client's CURVE handshake failed (it holds a wrong key for us?)",
    ("server", "handshake_failed"): "a client's handshake failed",
    ("server", "handshake_refused"): "refused a client key (not on the allow-list)",
}


def explain(side: str, event: int) -> tuple[str, str]:
    """(metric reason, message a person can act on) for a handshake-failure event."""
    reason = _FAILURES[event]
    return reason, _EXPLAIN[side, reason]


REPORT_AFTER = 3  # consecutive handshake failures before we blame the keys


def open_monitor(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A monitor on a unique inproc address (pyzmq's default names it by fd, and fds are
    reused while a closed socket's monitor may still be bound)."""
    return sock.get_monitor_socket(events, addr=f"inproc://monitor.{uuid.uuid4().hex}")


def close_monitor(sock: zmq.Socket, msock: zmq.Socket) -> None:
    """Stop the monitor before closing its reader: libzmq sends events from its I/O thread
    with a blocking send, so a monitor left without a reader would hang the whole context."""
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    msock.close(0)


class Monitor:
    """Watches one socket's connection events from inside its Loop."""

    def __init__(self, loop: Loop, sock: zmq.Socket, role: str, side: str, log: Log) -> None:
        self.role = role
        self.side = side
        self.ledger = PeerLedger()
        self.failures = 0
        self.last_error: str | None = None
        self._log = log
        self._burst = BurstLog(log)
        self._gauge = CONNECTED_PEERS.labels(role)
        self._counted = 0  # what this monitor added to the gauge
        self._loop = loop
        self._sock = sock
        self._msock = open_monitor(sock, _EVENTS)
        loop.add_reader(self._msock, self._drain)

    @property
    def peers(self) -> int:
        return self.ledger.peers

    def close(self) -> None:
        """Call before closing the watched socket."""
        self._loop.remove_reader(self._msock)
        close_monitor(self._sock, self._msock)
        self._gauge.dec(self._counted)
        self._counted = 0

    def _drain(self) -> None:
        for _ in range(256):
            try:
                event = recv_monitor_message(self._msock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(event["event"], event["value"], event.get("endpoint", b""))

    def _handle(self, event: int, value: int, endpoint: bytes) -> None:
        if event & _OPENED:
            self.ledger.opened(value)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.ledger.succeeded()
            self.failures = 0
            self.last_error = None
        elif event & _ENDED:
            self._ended(self.ledger.ended(value), endpoint)
        elif event in _FAILURES:
            self.ledger.failed()
            self._failed(event, endpoint)
        if self.ledger.peers != self._counted:
            self._gauge.inc(self.ledger.peers - self._counted)
            self._counted = self.ledger.peers

    def _ended(self, ending: Ending, endpoint: bytes) -> None:
        if ending is Ending.PEER_LEFT:
            # libzmq drops a handshaken peer that breaks the protocol (a frame over the socket's
            # ZMQ_MAXMSGSIZE, for one) exactly as one that hung up: its events cannot tell which
            PEER_DISCONNECTS.labels(self.role).inc()
        elif ending is Ending.BAD_GREETING:
            HANDSHAKE_FAILURES.labels(self.role, ending.value).inc()
            self._burst.event(ending.value, "dropped a connection that is not a ZeroMQ peer",
                              role=self.role, endpoint=endpoint.decode(errors="replace"))

    def _failed(self, event: int, endpoint: bytes) -> None:
        reason, explanation = explain(self.side, event)
        self.failures += 1
        AUTH_FAILURES.labels(self.side, reason).inc()
        HANDSHAKE_FAILURES.labels(self.role, reason).inc()
        # One failure can be an overloaded server hanging up mid-handshake; a run of them
        # with no success in between is a key problem, and is reported as one.
        if self.failures < REPORT_AFTER and reason != "handshake_refused":
            return
        self.last_error = explanation
        self._burst.event(reason, self.last_error, role=self.role,
                          endpoint=endpoint.decode(errors="replace"), consecutive=self.failures)
