"""The I/O around rules.py: read the current rules with `iptables-save`, apply with `iptables-restore`."""

from __future__ import annotations

import subprocess

TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
TIMEOUT = 30.0


class IptablesError(RuntimeError):
    """A save or restore failed; the message carries the tool's stderr."""


def _run(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IptablesError(f"{args[0]}: {exc}") from None
    if done.returncode:
        raise IptablesError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def save(family: int) -> str:
    return _run([TOOLS[family][0]])


def save_counters(family: int, table: str) -> str:
    """One table's rules with their `[packets:bytes]` counters."""
    return _run([TOOLS[family][0], "-c", "-t", table])


def restore_args(family: int) -> list[str]:
    """Apply one transaction per table, leaving every rule the input does not name alone; `-w` waits
    for the xtables lock that the legacy backend shares with kube-proxy and friends."""
    return [TOOLS[family][1], "-w", "5", "--noflush"]


def restore(family: int, text: str) -> None:
    if text:
        _run(restore_args(family), text)
