"""A publisher in its own process, for tests that kill -9 and restart it.

    python -m tests.bus.peer --keys DIR --pub EP --snapshot EP key=value ...

Publishes the given keys, prints `ready`, then applies `set KEY VALUE` / `del KEY`
lines from stdin (printing `ok` after each) until stdin closes.
"""

from __future__ import annotations

import argparse
import sys

from bus import logs
from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher
from bus.signing import Signer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", required=True)
    parser.add_argument("--name", default="pilot")
    parser.add_argument("--pub", required=True)
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--hb", type=float, default=0.2)
    parser.add_argument("items", nargs="*")
    args = parser.parse_args()
    logs.configure()
    ring = Keyring(args.keys, args.name)
    loop = Loop("peer")
    pub = Publisher(loop, pub_endpoint=args.pub, snapshot_endpoint=args.snapshot, keyring=ring,
                    signer=Signer(args.name, ring.signing_key()), hb_interval=args.hb, name=args.name)
    loop.start()
    for item in args.items:
        key, _, value = item.partition("=")
        pub.set(key, value)
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split(maxsplit=2)
        if parts[:1] == ["set"] and len(parts) == 3:
            pub.set(parts[1], parts[2].strip())
        elif parts[:1] == ["del"] and len(parts) == 2:
            pub.delete(parts[1])
        loop.call_sync(lambda: None)  # the change is on the wire before we say so
        print("ok", flush=True)
    loop.stop()


if __name__ == "__main__":
    main()
