"""Reports over PUSH/PULL: telemetry and status that may be lost but must never block.

The sender's queue is the socket's send high-water mark. When it is full (the
collector is slow or gone) the report is dropped and counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import zmq

from bus import envelope as E
from bus.context import socket
from bus.envelope import DecodeError
from bus.keys import Keyring
from bus.logs import Log
from bus.loop import Loop, drain
from bus.metrics import RECEIVED, REPORTS_DROPPED, SENT
from bus.monitor import Monitor
from bus.pubsub import Rejects, bind
from bus.security import secure_client, secure_server


class ReportSender:
    def __init__(self, endpoint: str, keyring: Keyring | None, server: str, *,
                 origin: str = "", queue: int = 1000, ctx: zmq.Context | None = None) -> None:
        self.origin = origin
        self.dropped = 0
        self._lock = threading.Lock()
        self._sock = socket(zmq.PUSH, E.MAX_CONTROL_BODY, ctx)  # it receives nothing
        self._sock.sndhwm = queue
        secure_client(self._sock, endpoint, keyring, server)
        self._sock.connect(endpoint)

    def send(self, topic: str, value: Any) -> bool:
        """Queue one report (a list of records for a batch); False when it had to be dropped."""
        frames = E.make(topic, E.REPORT, value, origin=self.origin).frames()
        with self._lock:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                REPORTS_DROPPED.inc()
                return False
        SENT.labels(E.REPORT).inc()
        return True

    def close(self) -> None:
        self._sock.close(0)


class ReportCollector:
    """Receives reports on a Loop; `handler(topic, value, origin)` runs in the loop thread."""

    def __init__(self, loop: Loop, endpoint: str, keyring: Keyring | None,
                 handler: Callable[[str, Any, str], None], name: str = "collector",
                 max_body: int = E.DEFAULT_MAX_BODY) -> None:
        self.loop = loop
        self._handler = handler
        self._max_body = max_body
        log = Log("bus.collector", name=name)
        self._reject = Rejects(log)
        self._sock = loop.socket(zmq.PULL, max_body)
        secure_server(self._sock, endpoint, keyring)
        self.endpoint = bind(self._sock, endpoint)
        self.monitor = Monitor(loop, self._sock, "reports", "server", log)
        loop.add_reader(self._sock, self._on_report)
        loop.on_close(self.close)

    def close(self) -> None:
        self.monitor.close()
        self.loop.remove_reader(self._sock)
        self._sock.close(0)

    def _on_report(self) -> None:
        for frames in drain(self._sock):
            try:
                env = E.decode(frames, self._max_body)
                if env.kind != E.REPORT:
                    raise DecodeError("bad_kind", f"{env.kind} on a report socket")
                value = env.value()
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            RECEIVED.labels(E.REPORT).inc()
            self._handler(env.topic, value, env.origin)
