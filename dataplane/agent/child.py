"""One supervised child process (the proxy, the decider): started in its own process group,
restarted with backoff when it dies, stopped with everything it forked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from bus.backoff import Backoff
from bus.logs import Log


class Child:
    """The agent's loop calls `tick` every few hundred ms; the child never blocks it."""

    def __init__(self, name: str, command: Sequence[str], backoff: Backoff, log: Log,
                 user: dict[str, int] | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.backoff = backoff
        self.log = log
        self.user = user or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at: float | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> bool:
        """False (logged) when it cannot be started (no such program, not allowed to setuid)."""
        try:
            # its own process group: workers orphaned by a killed supervisor can be swept up
            self.proc = subprocess.Popen(self.command, process_group=0, **self.user)
        except OSError as exc:
            self.log.error(f"cannot start the {self.name}", error=str(exc), **self.user)
            return False
        self.started = time.monotonic()
        self.log.info(f"{self.name} started", pid=self.proc.pid, **self.user)
        return True

    def tick(self) -> str | None:
        """Notice a death (schedule the restart) or restart when due: 'died', 'restarted', 'failed'
        (could not be started again) or None (nothing happened)."""
        if self.restart_at is not None:
            if time.monotonic() < self.restart_at:
                return None
            self.restart_at = None
            return "restarted" if self.start() else "failed"
        if self.proc is None or (code := self.proc.poll()) is None:
            return None
        uptime = time.monotonic() - self.started
        self.sweep()
        delay = self.backoff.next_after(uptime)
        self.log.warning(f"{self.name} exited; restarting", pid=self.proc.pid, reason=describe_exit(code),
                         uptime=f"{uptime:.1f}s", restart_in=f"{delay:g}s")
        self.restart_at = time.monotonic() + delay
        return "died"

    def sweep(self) -> None:
        """Kill what is left of its process group (workers of a supervisor that was killed)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always sweeps the group and reaps the child."""
        proc = self.proc
        self.restart_at = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.log.warning(f"{self.name} ignored SIGTERM; killing it", pid=proc.pid)
        self.sweep()
        proc.wait()
        self.log.info(f"{self.name} stopped", pid=proc.pid, reason=describe_exit(proc.returncode))


def describe_exit(returncode: int) -> str:
    """Popen's returncode as a reason for the log: 'exit code 3' or 'signal SIGKILL'."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"
