"""`meshctl bus ...`: key management and a live view of any bus prefix."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from bus import endpoints, keys, logs
from bus.loop import Loop
from bus.pubsub import Subscriber
from bus.signing import Verifier


@click.group("bus")
def bus_group() -> None:
    """The ZeroMQ bus: keys and inspection."""


@bus_group.command("keygen")
@click.option("--dir", "directory", type=click.Path(file_okay=False), required=True,
              help="The mesh key directory.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.argument("names", nargs=-1, required=True)
def keygen(directory: str, force: bool, names: tuple[str, ...]) -> None:
    """Write a CURVE pair and an Ed25519 signing pair for each NAME."""
    for name in names:
        try:
            files = keys.generate(directory, name, overwrite=force)
        except (FileExistsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{name}: " + ", ".join(str(f) for f in files))


@bus_group.command("watch")
@click.option("--keys", "key_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--as", "name", required=True, help="Our key name in the key directory.")
@click.option("--server", default="pilot", show_default=True,
              help="The publisher's key name (its CURVE public key is checked).")
@click.option("--pub", "pub_endpoint", help="Publisher endpoint [default: the server's port].")
@click.option("--snapshot", "snapshot_endpoint", help="Snapshot endpoint.")
@click.option("--count", type=int, default=0, help="Exit after this many changes (0: run on).")
@click.argument("prefix", default="")
def watch(key_dir: str, name: str, server: str, pub_endpoint: str | None,
          snapshot_endpoint: str | None, count: int, prefix: str) -> None:
    """Print every change under PREFIX as one JSON line, starting with the snapshot."""
    logs.configure()
    keyring = keys.Keyring(Path(key_dir), name)
    pub_endpoint = pub_endpoint or endpoints.tcp(server, "pub")
    snapshot_endpoint = snapshot_endpoint or endpoints.tcp(server, "snapshot")
    done = threading.Event()
    seen = 0

    def on_change(key: str, value: object) -> None:
        nonlocal seen
        click.echo(json.dumps({"key": key, "value": value, "deleted": value is None},
                              default=repr), nl=True)
        sys.stdout.flush()
        seen += 1
        if count and seen >= count:
            done.set()

    loop = Loop("watch")
    try:
        Subscriber(loop, pub_endpoint=pub_endpoint, snapshot_endpoint=snapshot_endpoint,
                   prefix=prefix, keyring=keyring, server=server,
                   verifier=Verifier(keyring.trusted_signers), on_change=on_change, name=name)
    except keys.KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    loop.start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    loop.stop()
