"""Reliable keyed pub/sub sockets: thin I/O shells around `bus.clone`.

A Publisher owns an XPUB (updates, heartbeats, subscription tracking) and a ROUTER
(snapshots). A Subscriber owns a SUB and a DEALER for snapshots. Both live on a Loop.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from bus import envelope as E
from bus.clone import Changed, CloneStore, CloneSubscriber, RequestSnapshot, Resync, Synced
from bus.envelope import DecodeError, Envelope
from bus.keys import Keyring
from bus.logs import BurstLog, Log
from bus.loop import Loop, drain, has_input
from bus.metrics import GAPS, RECEIVED, REJECTED, RESNAPSHOTS, SENT
from bus.monitor import Monitor
from bus.security import secure_client, secure_server
from bus.signing import Signer, Verifier

# labelled children, looked up once: `labels()` costs more than the rest of a receive
_SENT = {kind: SENT.labels(kind) for kind in E.KINDS}
_RECEIVED = {kind: RECEIVED.labels(kind) for kind in E.KINDS}
_DRAIN_BATCH = 512
DEFAULT_HWM = 10000
_WELCOME_DELAY = 0.01


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the resolved endpoint (a `*` port becomes the real one)."""
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Rejects:
    """Counts and logs (once per burst) every message a socket had to drop."""

    def __init__(self, log: Log) -> None:
        self._burst = BurstLog(log)

    def __call__(self, reason: str, detail: str = "", **fields: Any) -> None:
        REJECTED.labels(reason).inc()
        self._burst.event(reason, "dropped bus message", detail=detail, **fields)


class Publisher:
    """Publishes keyed, signed updates; serves snapshots; heartbeats every subscribed prefix.

    With `signer=None` it is a mirror (a relay's downstream side): it forwards envelopes
    signed elsewhere, keeping their origin, epoch and sequence.
    """

    def __init__(self, loop: Loop, *, pub_endpoint: str, snapshot_endpoint: str,
                 keyring: Keyring | None, signer: Signer | None, name: str = "publisher",
                 hb_interval: float = 1.0, hwm: int = DEFAULT_HWM, serving: bool = True) -> None:
        self.loop = loop
        self.name = name
        self.signer = signer
        self.store = CloneStore(epoch=None if signer else 0)
        self.serving = serving
        self.log = Log("bus.publisher", name=name)
        self._reject = Rejects(self.log)
        self._pub = loop.socket(zmq.XPUB, E.MAX_CONTROL_BODY)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._pub.sndhwm = hwm
        secure_server(self._pub, pub_endpoint, keyring)
        self.pub_endpoint = bind(self._pub, pub_endpoint)
        self._router = loop.socket(zmq.ROUTER, E.MAX_CONTROL_BODY)
        self._router.sndhwm = hwm
        secure_server(self._router, snapshot_endpoint, keyring)
        self.snapshot_endpoint = bind(self._router, snapshot_endpoint)
        self.monitor = Monitor(loop, self._pub, "publisher", "server", self.log)
        self.snapshot_monitor = Monitor(loop, self._router, "snapshot", "server", self.log)
        loop.add_reader(self._pub, self._on_subscription)
        loop.add_reader(self._router, self._on_snapshot_request)
        self._hb_timer = loop.call_every(hb_interval, self.heartbeat_all)
        self._welcomes: set[str] = set()
        self._snapshots: dict[str, tuple[tuple[int, int], list[bytes]]] = {}
        loop.on_close(self.close)

    # -- API (any thread) --
    def set(self, key: str, value: Any, config_version: str = "") -> None:
        body = E.pack_body(value)
        self._in_loop(lambda: self._publish_local(E.make(key, E.UPDATE, body=body,
                                                         config_version=config_version)))

    def delete(self, key: str) -> None:
        self._in_loop(lambda: self._publish_local(E.make(key, E.DELETE)))

    def set_many(self, entries: list[tuple[str, bytes | None, str]]) -> None:
        """Publish encoded bodies (None: delete) as (key, body, config_version), all in one loop
        turn: no snapshot is served between two of them, so keys that only make sense
        together are never seen apart."""
        envs = [E.make(key, E.UPDATE, body=body, config_version=version) if body is not None
                else E.make(key, E.DELETE) for key, body, version in entries]

        def run() -> None:
            for env in envs:
                self._publish_local(env)
        self._in_loop(run)

    def forward(self, env: Envelope) -> None:
        """Mirror mode: publish an envelope signed by its origin, unchanged."""
        self._in_loop(lambda: self._send(env))

    def replace(self, epoch: int, seq: int, entries: dict[str, Envelope]) -> None:
        """Mirror mode: adopt a re-synced state and tell every subscriber at once."""
        def run() -> None:
            self.store.replace(epoch, seq, entries)
            self.serving = True
            self.heartbeat_all()
        self._in_loop(run)

    def close(self) -> None:
        self._hb_timer.cancel()
        self.monitor.close()
        self.snapshot_monitor.close()
        for sock in (self._pub, self._router):
            self.loop.remove_reader(sock)
            sock.close(0)

    # -- internals (loop thread) --
    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self.loop.in_loop():
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    def _publish_local(self, env: Envelope) -> None:
        assert self.signer is not None, "a mirror publisher only forwards"
        if len(env.body) > E.DEFAULT_MAX_BODY:
            # no subscriber's socket would take it (libzmq drops the connection, and the snapshot
            # that carries it, over and over): refuse it here, where the cause is
            self._reject("body_too_large", f"{env.topic}: {len(env.body)} bytes > {E.DEFAULT_MAX_BODY}",
                         where="publish")
            return
        self.store.stamp(env)
        self.signer.sign(env)
        self._send(env)

    def _send(self, env: Envelope) -> None:
        if env.prev:
            env = dataclasses.replace(env, prev={})  # upstream's chains mean nothing here
        prev = self.store.apply(env)
        wire = dataclasses.replace(env, prev=prev)
        try:
            self._pub.send_multipart(wire.frames(), zmq.NOBLOCK)
            _SENT[env.kind].inc()
        except zmq.Again:
            pass  # XPUB drops per slow subscriber; it never raises Again

    def heartbeat_all(self) -> None:
        if not self.serving:
            return
        for prefix in list(self.store.chains):
            self._heartbeat(prefix)

    def _heartbeat(self, prefix: str) -> None:
        try:
            self._pub.send_multipart(self.store.heartbeat(prefix).frames(), zmq.NOBLOCK)
            _SENT[E.HEARTBEAT].inc()
        except zmq.Again:
            pass

    def _on_subscription(self) -> None:
        for frames in drain(self._pub, _DRAIN_BATCH):
            msg = frames[0]
            if len(frames) != 1 or not msg or msg[0] not in (0, 1):
                self._reject("bad_subscription", f"{len(msg)} bytes")
                continue
            try:
                prefix = msg[1:].decode()
            except UnicodeDecodeError:
                self._reject("bad_subscription", "prefix is not UTF-8")
                continue
            if msg[0] == 1:
                self.store.subscribe(prefix)
                self._welcome(prefix)
            else:
                self.store.unsubscribe(prefix)

    def _snapshot_entries(self, prefix: str) -> list[bytes]:
        """Encoded entries under `prefix`, reused while the state has not moved (a join storm
        asks for the same snapshot a thousand times)."""
        stamp = (self.store.epoch, self.store.seq)
        cached = self._snapshots.get(prefix)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        out: list[bytes] = []
        for entry in self.store.subtree(prefix):
            out += entry.frames()
        if len(self._snapshots) > 1024:
            self._snapshots.clear()
        self._snapshots[prefix] = (stamp, out)
        return out

    def _welcome(self, prefix: str) -> None:
        """Answer a subscription with a heartbeat on its prefix: proof to the subscriber that
        we now track it. A burst of joins to one prefix shares a single welcome (else N joins
        would cost N x N heartbeats)."""
        if not self._welcomes:
            self.loop.call_later(_WELCOME_DELAY, self._send_welcomes)
        self._welcomes.add(prefix)

    def _send_welcomes(self) -> None:
        welcomes, self._welcomes = self._welcomes, set()
        if self.serving:
            for prefix in welcomes:
                if prefix in self.store.chains:
                    self._heartbeat(prefix)

    def _on_snapshot_request(self) -> None:
        for frames in drain(self._router, _DRAIN_BATCH):
            if len(frames) != 4:
                self._reject("frame_count", f"snapshot request with {len(frames)} frames")
                continue
            try:
                req = E.decode(frames[1:], E.MAX_CONTROL_BODY)
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            if req.kind != E.SNAPSHOT_REQUEST:
                self._reject("bad_kind", f"{req.kind} on the snapshot socket")
                continue
            _RECEIVED[req.kind].inc()
            if not self.serving:
                continue  # the client's timeout retries once we hold a state
            entry_frames = self._snapshot_entries(req.topic)
            head = self.store.snapshot_head(req.topic, len(entry_frames) // 3)
            head.req_id = req.req_id
            out = [frames[0], *head.frames(), *entry_frames]
            try:
                self._router.send_multipart(out, zmq.NOBLOCK)
                _SENT[E.SNAPSHOT].inc()
            except zmq.ZMQError:
                pass  # peer gone; it will ask again


class Subscriber:
    """Keeps a verified copy of one prefix of a Publisher's state, re-syncing on any doubt.

    `on_change(key, value)` runs in the loop thread for every change (value None: deleted);
    while it runs, `incremental` is False if the change comes from a snapshot swap, whose
    state is whole only when `on_sync` runs.
    Reads (`get`, `items`, `ready`) are safe from any thread.
    """

    def __init__(self, loop: Loop, *, pub_endpoint: str, snapshot_endpoint: str, prefix: str,
                 keyring: Keyring | None, server: str, verifier: Verifier,
                 on_change: Callable[[str, Any], None] | None = None,
                 on_apply: Callable[[Envelope], None] | None = None,
                 on_sync: Callable[[Subscriber], None] | None = None,
                 name: str = "subscriber", silence_timeout: float = 3.0,
                 snapshot_timeout: float = 2.0, hwm: int = DEFAULT_HWM,
                 max_body: int = E.DEFAULT_MAX_BODY, monitor: bool = True) -> None:
        self.loop = loop
        self.prefix = prefix
        self.name = name
        self.machine = CloneSubscriber(prefix, silence_timeout, snapshot_timeout)
        self.log = Log("bus.subscriber", name=name, prefix=prefix)
        self._reject = Rejects(self.log)
        self._verifier = verifier
        self._on_change = on_change
        self._on_apply = on_apply
        self._on_sync = on_sync
        self._max_body = max_body
        self._values: dict[str, Any] = {}
        self.incremental = True
        self._ready = threading.Event()
        self.resyncs = 0
        self._sub = loop.socket(zmq.SUB, max_body)
        self._sub.rcvhwm = hwm
        secure_client(self._sub, pub_endpoint, keyring, server)
        self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._dealer = loop.socket(zmq.DEALER, max_body)
        secure_client(self._dealer, snapshot_endpoint, keyring, server)
        self.monitor = Monitor(loop, self._sub, "subscriber", "client", self.log) if monitor else None
        self._sub.connect(pub_endpoint)
        self._dealer.connect(snapshot_endpoint)
        loop.add_reader(self._sub, self._on_sub)
        loop.add_reader(self._dealer, self._on_dealer)
        self._tick_interval = min(0.25, silence_timeout / 4)
        loop.add_ticker(self._tick_interval, self._tick)
        loop.on_close(self.close)

    # -- API (any thread) --
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        return self._ready.wait(timeout)

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def items(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def last_error(self) -> str | None:
        return self.monitor.last_error if self.monitor else None

    def close(self) -> None:
        self.loop.remove_ticker(self._tick_interval, self._tick)
        if self.monitor:
            self.monitor.close()
        for sock in (self._sub, self._dealer):
            self.loop.remove_reader(sock)
            sock.close(0)

    # -- internals (loop thread) --
    def _on_sub(self) -> None:
        for frames in drain(self._sub, _DRAIN_BATCH):
            try:
                env = E.decode(frames, self._max_body)
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            if env.kind in (E.UPDATE, E.DELETE):
                reason = self._verifier.check(env)
                if reason is not None:
                    self._reject(reason, env.topic, origin=env.origin)
                    continue
            elif env.kind != E.HEARTBEAT:
                self._reject("bad_kind", f"{env.kind} on a SUB socket")
                continue
            _RECEIVED[env.kind].inc()
            self._act(self.machine.on_message(env, time.monotonic()))

    def _on_dealer(self) -> None:
        for frames in drain(self._dealer, _DRAIN_BATCH):
            try:
                head, entries, errors = E.decode_snapshot(frames, self._max_body)
            except DecodeError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            for exc in errors:
                self._reject(exc.reason, exc.detail, where="snapshot")
            valid = True
            for entry in entries:
                reason = self._verifier.check(entry)
                if reason is not None:
                    self._reject(reason, entry.topic, origin=entry.origin, where="snapshot")
                    valid = False
            _RECEIVED[E.SNAPSHOT].inc()
            self._act(self.machine.on_snapshot(head, entries, time.monotonic(), valid))

    def _tick(self) -> None:
        # A busy loop is not a silent publisher: read what is already queued before judging
        # silence or a snapshot timeout (else a loop slowed by one re-sync makes its other
        # subscribers re-sync too, and the re-syncs feed each other).
        if has_input(self._sub):
            self._on_sub()
        if has_input(self._dealer):
            self._on_dealer()
        self._act(self.machine.on_tick(time.monotonic()))

    def _act(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Changed):
                self._changed(action)
            elif isinstance(action, RequestSnapshot):
                req = E.make(self.prefix, E.SNAPSHOT_REQUEST, req_id=action.req_id)
                try:
                    self._dealer.send_multipart(req.frames(), zmq.NOBLOCK)
                    _SENT[E.SNAPSHOT_REQUEST].inc()
                except zmq.Again:
                    pass  # not connected yet: the snapshot timeout asks again
            elif isinstance(action, Resync):
                self.resyncs += 1
                RESNAPSHOTS.labels(action.cause).inc()
                if action.cause in ("gap", "tail-gap"):
                    GAPS.inc()
                self.log.info("re-snapshot", cause=action.cause, seq=self.machine.seq)
            elif isinstance(action, Synced):
                self.log.debug("synced", epoch=action.epoch, seq=action.seq, keys=action.keys)
                self._ready.set()
                if self._on_sync is not None:
                    self._on_sync(self)

    def _changed(self, change: Changed) -> None:
        if change.incremental and self._on_apply is not None and change.env is not None:
            self._on_apply(change.env)
        if change.deleted:
            if self._values.pop(change.key, _MISSING) is _MISSING:
                return
            value = None
        else:
            try:
                value = change.env.value()
            except DecodeError as exc:
                self._reject(exc.reason, change.key)
                return
            self._values[change.key] = value
        if self._on_change is not None:
            self.incremental = change.incremental
            self._on_change(change.key, value)


_MISSING = object()
