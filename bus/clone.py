"""Sans-IO state machines for reliable keyed pub/sub, after the ZeroMQ Guide's Clone pattern.

Publisher side (`CloneStore`): keyed state, one global sequence per epoch, and a
*chain* per subscribed prefix: the sequence of the last update that touched it.
Every update carries, in its `p` header, the chain value each subscribed prefix had
before it. Heartbeats carry the current chain of one prefix.

Subscriber side (`CloneSubscriber`): a subscriber to prefix P checks that each
update's `p[P]` equals the sequence of the last update it applied under P. A
mismatch is a gap, even when the subscriber sees only a filtered slice of the
global sequence; a heartbeat whose chain differs reveals a lost tail. Either one,
silence or a new epoch triggers a re-snapshot while the old state keeps being served.

The handshake closes the slow-joiner window: the publisher (an XPUB) answers every
subscription with a heartbeat on that prefix, and the subscriber asks for its
snapshot only after seeing one, so nothing published after the snapshot can miss it.
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bus.envelope import DELETE, HEARTBEAT, SNAPSHOT, UPDATE, Envelope, make


def new_epoch() -> int:
    """A random 63-bit epoch: a restarted publisher is recognisable as new."""
    return int.from_bytes(os.urandom(8), "big") >> 1 or 1


class CloneStore:
    """The publisher's keyed state, sequencing and per-prefix chains."""

    def __init__(self, epoch: int | None = None) -> None:
        self.epoch = epoch if epoch is not None else new_epoch()
        self.seq = 0
        self.entries: dict[str, Envelope] = {}
        self.chains: dict[str, int] = {}

    # -- subscriptions (from XPUB) --
    def subscribe(self, prefix: str) -> None:
        self.chains.setdefault(prefix, self.seq)

    def unsubscribe(self, prefix: str) -> None:
        self.chains.pop(prefix, None)

    # -- updates --
    def stamp(self, env: Envelope) -> Envelope:
        """Give a locally originated update the next sequence and this epoch."""
        self.seq += 1
        env.seq = self.seq
        env.epoch = self.epoch
        return env

    def apply(self, env: Envelope) -> dict[str, int]:
        """Record a stamped update; returns the `prev` chains it must be sent with."""
        if env.seq < self.seq:
            raise ValueError(f"sequence {env.seq} is older than {self.seq}")
        self.seq = max(self.seq, env.seq)
        prev: dict[str, int] = {}
        for prefix, last in self.chains.items():
            if env.topic.startswith(prefix):
                prev[prefix] = last
                self.chains[prefix] = env.seq
        if env.kind == DELETE:
            self.entries.pop(env.topic, None)
        else:
            self.entries[env.topic] = env
        return prev

    def replace(self, epoch: int, seq: int, entries: dict[str, Envelope]) -> None:
        """Adopt a whole new state (a relay after re-syncing upstream); re-anchor every chain,
        so downstream subscribers see a mismatch and re-snapshot."""
        self.epoch, self.seq, self.entries = epoch, seq, dict(entries)
        for prefix in self.chains:
            self.chains[prefix] = seq

    # -- reads --
    def subtree(self, prefix: str) -> Iterator[Envelope]:
        return (env for key, env in self.entries.items() if key.startswith(prefix))

    def snapshot_head(self, prefix: str, count: int) -> Envelope:
        prev = {prefix: self.chains[prefix]} if prefix in self.chains else {}
        return make(prefix, SNAPSHOT, seq=self.seq, epoch=self.epoch, prev=prev, count=count)

    def heartbeat(self, prefix: str) -> Envelope:
        return make(prefix, HEARTBEAT, seq=self.seq, epoch=self.epoch,
                    prev={prefix: self.chains.get(prefix, self.seq)})


class Phase(enum.Enum):
    WAIT_WELCOME = "wait-welcome"  # subscribed; waiting for proof the publisher has us
    SNAPSHOT = "snapshot"          # snapshot requested; buffering updates
    LIVE = "live"


@dataclass(frozen=True)
class RequestSnapshot:
    req_id: bytes


@dataclass(frozen=True)
class Changed:
    """A key changed. `env` is the update or delete applied, or None for a key that a new
    snapshot no longer holds; `incremental` is False for changes found by a snapshot swap."""

    key: str
    env: Envelope | None
    incremental: bool = True

    @property
    def deleted(self) -> bool:
        return self.env is None or self.env.kind == DELETE


@dataclass(frozen=True)
class Resync:
    cause: str  # gap | tail-gap | epoch | silence | snapshot-timeout | bad-snapshot


@dataclass(frozen=True)
class Synced:
    epoch: int
    seq: int
    keys: int


Action = RequestSnapshot | Changed | Resync | Synced


class CloneSubscriber:
    """Subscriber state for one prefix. Feed it messages and ticks; it returns actions."""

    def __init__(self, prefix: str, silence_timeout: float = 3.0,
                 snapshot_timeout: float = 2.0, jitter: Callable[[], float] = random.random) -> None:
        self.prefix = prefix
        self.silence_timeout = silence_timeout
        self.snapshot_timeout = snapshot_timeout
        self._jitter = jitter
        self._retries = 0
        self.phase = Phase.WAIT_WELCOME
        self.state: dict[str, Envelope] = {}
        self.epoch = 0
        self.seq = 0
        self.chain = 0
        self.ready = False
        self._pending: list[Envelope] = []
        self._req_id = b""
        self._req_counter = 0
        self._deadline = 0.0
        self._last_heard: float | None = None

    # -- inputs --
    def on_message(self, env: Envelope, now: float) -> list[Action]:
        """An update, delete or heartbeat received on the SUB socket (signature already checked)."""
        self._last_heard = now
        if env.kind == HEARTBEAT:
            return self._on_heartbeat(env, now)
        if env.kind not in (UPDATE, DELETE) or not env.topic.startswith(self.prefix):
            return []
        if self.phase is Phase.SNAPSHOT:
            self._pending.append(env)
            return []
        if self.phase is Phase.WAIT_WELCOME:
            return []  # the snapshot we are about to ask for will include it
        if env.epoch != self.epoch:
            return self._resync("epoch", now, [env])
        if env.seq <= self.seq:
            return []  # a duplicate after a re-snapshot
        if env.prev.get(self.prefix) != self.chain:
            return self._resync("gap", now, [env])
        return self._apply(env)

    def on_snapshot(self, head: Envelope, entries: list[Envelope], now: float,
                    valid: bool = True) -> list[Action]:
        """A snapshot reply; `valid` is False when any entry failed verification."""
        if self.phase is not Phase.SNAPSHOT or head.req_id != self._req_id:
            return []  # late reply to an abandoned request
        self._last_heard = now
        if not valid:
            return self._resync("bad-snapshot", now, self._pending)
        if self.prefix not in head.prev:
            self.phase = Phase.WAIT_WELCOME  # the publisher lost our subscription (restart)
            return []
        new_state = {e.topic: e for e in entries if e.topic.startswith(self.prefix)}
        actions: list[Action] = self._swap(new_state)
        self.epoch, self.seq, self.chain = head.epoch, head.seq, head.prev[self.prefix]
        self.phase = Phase.LIVE
        self.ready = True
        actions.append(Synced(self.epoch, self.seq, len(self.state)))
        pending, self._pending = self._pending, []
        for env in pending:
            actions += self.on_message(env, now)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        if self._last_heard is None:
            self._last_heard = now
        if self.phase is not Phase.WAIT_WELCOME and now - self._last_heard > self.silence_timeout:
            self.phase = Phase.WAIT_WELCOME
            self._pending = []
            return [Resync("silence")]
        if self.phase is Phase.SNAPSHOT and now > self._deadline:
            return [Resync("snapshot-timeout"), self._request(now, retry=True)]
        return []

    # -- internals --
    def _on_heartbeat(self, env: Envelope, now: float) -> list[Action]:
        if env.topic != self.prefix:
            return []  # a heartbeat for a longer prefix: liveness only
        if self.phase is Phase.WAIT_WELCOME:
            self._pending = []
            return [self._request(now)]
        if self.phase is Phase.LIVE:
            if env.epoch != self.epoch:
                return self._resync("epoch", now, [])
            if env.seq > self.seq and env.prev.get(self.prefix) != self.chain:
                return self._resync("tail-gap", now, [])  # (an older heartbeat says nothing)
        return []

    def _resync(self, cause: str, now: float, pending: list[Envelope]) -> list[Action]:
        self._pending = list(pending)
        return [Resync(cause), self._request(now)]

    def _request(self, now: float, retry: bool = False) -> RequestSnapshot:
        """Ask for a snapshot. Retries back off (x2, up to x8) with +-25% jitter, so a thousand
        subscribers that joined together do not keep asking together."""
        self._retries = self._retries + 1 if retry else 0
        self._req_counter += 1
        self._req_id = self._req_counter.to_bytes(8, "big")
        factor = 2 ** min(self._retries, 3) * (0.75 + 0.5 * self._jitter())
        self._deadline = now + self.snapshot_timeout * factor
        self.phase = Phase.SNAPSHOT
        return RequestSnapshot(self._req_id)

    def _apply(self, env: Envelope) -> list[Action]:
        self.seq = env.seq
        self.chain = env.seq
        if env.kind == DELETE:
            self.state.pop(env.topic, None)
        else:
            self.state[env.topic] = env
        return [Changed(env.topic, env)]

    def _swap(self, new_state: dict[str, Envelope]) -> list[Action]:
        """Replace the served state; report only what actually changed."""
        actions: list[Action] = [Changed(k, None, False) for k in self.state if k not in new_state]
        for key, env in new_state.items():
            old = self.state.get(key)
            if old is None or old.body != env.body or old.seq != env.seq:
                actions.append(Changed(key, env, False))
        self.state = new_state
        return actions
