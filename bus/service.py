"""What every control-plane process does the same way: its signed publisher on its own
ports, and running until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading

from bus import endpoints
from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher
from bus.signing import Signer


def signed_publisher(loop: Loop, component: str, keyring: Keyring, host: str,
                     port_base: int | None) -> Publisher:
    """The component's Publisher on its pub/snapshot ports, signing as its key name
    (raises keys.KeyringError when the keys are missing)."""
    return Publisher(loop, pub_endpoint=endpoints.tcp(component, "pub", host, port_base),
                     snapshot_endpoint=endpoints.tcp(component, "snapshot", host, port_base),
                     keyring=keyring, signer=Signer(keyring.name, keyring.signing_key()), name=keyring.name)


def run_until_signalled(loop: Loop) -> None:
    """Run `loop` in its thread until SIGTERM or SIGINT, then stop it (closing its sockets)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    loop.start()
    done.wait()
    loop.stop()
