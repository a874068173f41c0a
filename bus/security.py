"""CURVE on every tcp:// endpoint, with a ZAP handler that admits only keys in the keyring.

The ZAP handler runs one thread per context. It answers 200 with the client's key
name as User-Id (servers use it to know which node agent is asking) and 400 for
any other key; refusals are counted and logged once per burst.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils import z85

from bus.context import socket
from bus.envelope import MAX_CONTROL_BODY
from bus.keys import Keyring, load_allowed_clients
from bus.logs import BurstLog, Log
from bus.metrics import AUTH_FAILURES

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zmesh"
_RELOAD_INTERVAL = 1.0


class ZapHandler:
    """Allow-list authentication for CURVE clients (RFC 27), reloading the key directory."""

    def __init__(self, ctx: zmq.Context, allowed: Callable[[], dict[bytes, str]]) -> None:
        self._ctx = ctx
        self._load = allowed
        self._allowed = allowed()
        self._loaded_at = time.monotonic()
        self._log = Log("bus.zap")
        self._burst = BurstLog(self._log)
        self._sock = socket(zmq.REP, MAX_CONTROL_BODY, ctx)
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()

    def _lookup(self, key: bytes) -> str | None:
        name = self._allowed.get(key)
        if name is None and time.monotonic() - self._loaded_at > _RELOAD_INTERVAL:
            self._allowed = self._load()
            self._loaded_at = time.monotonic()
            name = self._allowed.get(key)
        return name

    def _run(self) -> None:
        while True:
            try:
                msg = self._sock.recv_multipart()
            except zmq.ContextTerminated:
                self._sock.close(0)
                return
            except zmq.ZMQError:
                continue
            try:
                reply = self._answer(msg)
            except Exception:  # never let one odd request stop authentication for the process
                self._log.error("ZAP request failed", exc_info=True)
                reply = [b"1.0", msg[1] if len(msg) > 1 else b"", b"500", b"internal error", b"", b""]
            self._sock.send_multipart(reply)

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = msg[:6]
        credentials = msg[6:]
        if mechanism != b"CURVE" or len(credentials) != 1:
            AUTH_FAILURES.labels("server", "mechanism").inc()
            self._burst.event("mechanism", "refused non-CURVE client",
                              mechanism=mechanism.decode(errors="replace"),
                              address=address.decode(errors="replace"))
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(credentials[0])
        name = self._lookup(key)
        if name is None:
            AUTH_FAILURES.labels("server", "unknown_key").inc()
            self._burst.event("unknown_key", "refused unknown CURVE client key",
                              key=key.decode(), address=address.decode(errors="replace"),
                              domain=domain.decode(errors="replace"))
            return [version, request_id, b"400", b"unknown client key", b"", b""]
        return [version, request_id, b"200", b"OK", name.encode(), b""]


_zap_lock = threading.Lock()
_zap_handlers: dict[int, ZapHandler] = {}


def ensure_zap(ctx: zmq.Context, keyring: Keyring) -> None:
    """Start the context's ZAP handler once; every server socket in it shares the allow-list."""
    with _zap_lock:
        if id(ctx) not in _zap_handlers:
            _zap_handlers[id(ctx)] = ZapHandler(ctx, lambda: load_allowed_clients(keyring.directory))


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def secure_server(sock: zmq.Socket, endpoint: str, keyring: Keyring | None) -> None:
    """Make `sock` a CURVE server when it binds TCP (ipc:// relies on file permissions)."""
    if not is_tcp(endpoint):
        return
    if keyring is None:
        raise ValueError(f"{endpoint}: a keyring is required for tcp:// endpoints")
    keys = keyring.curve()
    ensure_zap(sock.context, keyring)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = ZAP_DOMAIN
    sock.curve_server = True


def secure_client(sock: zmq.Socket, endpoint: str, keyring: Keyring | None, server: str) -> None:
    """Make `sock` a CURVE client of the component named `server` when it connects over TCP."""
    if not is_tcp(endpoint):
        return
    if keyring is None:
        raise ValueError(f"{endpoint}: a keyring is required for tcp:// endpoints")
    keys = keyring.curve()
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keyring.curve_public(server)
