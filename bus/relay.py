"""A relay: one upstream subscription re-published to local clients over ipc://.

The node agent runs one so that N local proxies cost the control plane one
connection. The relay serves snapshots itself from its mirror of the prefix. It
forwards envelopes exactly as their origin signed them, so local clients verify
the origin's signature and a compromised relay cannot forge or alter config.
"""

from __future__ import annotations

import os

from bus.envelope import Envelope
from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher, Subscriber
from bus.signing import Verifier


class Relay:
    def __init__(self, loop: Loop, *, upstream_pub: str, upstream_snapshot: str, server: str,
                 prefix: str, keyring: Keyring | None, verifier: Verifier,
                 local_pub: str, local_snapshot: str, name: str = "relay",
                 hb_interval: float = 1.0, silence_timeout: float = 3.0) -> None:
        # The downstream side holds no state until the first upstream sync: clients
        # are not welcomed before then, so none can take an empty state for the truth.
        self.publisher = Publisher(loop, pub_endpoint=local_pub, snapshot_endpoint=local_snapshot,
                                   keyring=keyring, signer=None, name=f"{name}-local",
                                   hb_interval=hb_interval, serving=False)
        for endpoint in (self.publisher.pub_endpoint, self.publisher.snapshot_endpoint):
            if endpoint.startswith("ipc://"):
                os.chmod(endpoint[len("ipc://"):], 0o600)
        self.subscriber = Subscriber(loop, pub_endpoint=upstream_pub,
                                     snapshot_endpoint=upstream_snapshot, prefix=prefix,
                                     keyring=keyring, server=server, verifier=verifier,
                                     on_apply=self._forward, on_sync=self._resynced,
                                     name=f"{name}-upstream", silence_timeout=silence_timeout)

    @property
    def local_pub(self) -> str:
        return self.publisher.pub_endpoint

    @property
    def local_snapshot(self) -> str:
        return self.publisher.snapshot_endpoint

    def _forward(self, env: Envelope) -> None:
        # After a re-sync the machine replays updates that arrived during the snapshot, and
        # `_resynced` has already adopted the state that includes them: do not send them twice.
        if env.epoch == self.publisher.store.epoch and env.seq <= self.publisher.store.seq:
            return
        self.publisher.forward(env)

    def _resynced(self, sub: Subscriber) -> None:
        m = sub.machine
        self.publisher.replace(m.epoch, m.seq, m.state)
