"""Ed25519 signatures over published bodies, so that relays cannot forge or alter config.

The signature covers the topic, the signed header fields and the body bytes as sent.
Verification results are cached by content: a process hosting many subscribers pays
for one verification per message, not one per socket.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bus.envelope import Envelope

_CACHE_SIZE = 65536  # a node's full config at 1000 services is ~4000 keys; each proxy checks them all
_RELOAD_INTERVAL = 1.0


def signed_bytes(env: Envelope) -> bytes:
    return msgpack.packb([env.topic, env.signed_fields(), env.body], use_bin_type=True)


class Signer:
    def __init__(self, origin: str, key: Ed25519PrivateKey) -> None:
        self.origin = origin
        self._key = key

    def sign(self, env: Envelope) -> Envelope:
        """Stamp `env` with this origin and its signature (in place, returned for chaining)."""
        env.origin = self.origin
        env.sig = self._key.sign(signed_bytes(env))
        return env


class Verifier:
    """Checks an envelope's signature against the trusted signers; returns a reject reason."""

    def __init__(self, trusted: dict[str, Ed25519PublicKey] | Callable[[], dict[str, Ed25519PublicKey]]
                 ) -> None:
        self._load = trusted if callable(trusted) else (lambda: trusted)
        self._trusted = self._load()
        self._loaded_at = time.monotonic()
        self._verified: OrderedDict[bytes, tuple[str, list, bytes]] = OrderedDict()

    def reload(self) -> None:
        """Re-read the trusted keys, at most once a second (garbage origins must not cost I/O)."""
        now = time.monotonic()
        if now - self._loaded_at < _RELOAD_INTERVAL:
            return
        self._loaded_at = now
        self._trusted = self._load()
        self._verified.clear()

    def check(self, env: Envelope) -> str | None:
        """None when the signature is good, else the metric reason for dropping."""
        if env.sig is None:
            return "unsigned"
        key = self._trusted.get(env.origin)
        if key is None:
            self.reload()  # a new component may have been added to the keyring
            key = self._trusted.get(env.origin)
            if key is None:
                return "unknown_signer"
        fields = env.signed_fields()
        cached = self._verified.get(env.sig)
        if cached is not None and cached == (env.topic, fields, env.body):
            self._verified.move_to_end(env.sig)  # least recently used goes first, not the oldest
            return None
        try:
            key.verify(env.sig, signed_bytes(env))
        except InvalidSignature:
            return "bad_signature"
        self._verified[env.sig] = (env.topic, fields, env.body)
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return None
