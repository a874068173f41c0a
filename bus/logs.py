"""Structured logging: one line per event, `key=value` pairs, always naming the component.

`BurstLog` keeps a flood of identical warnings (garbage on a socket) to one line per
burst plus a count, so an attacker cannot fill the disk through our logs.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_CONFIGURED = False


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {})
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"msg={_fmt(record.getMessage())}"]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append("exc=" + _fmt(self.formatException(record.exc_info)))
        return " ".join(parts)


def configure(level: str | int = "INFO") -> None:
    """Install the one-line formatter on stderr (idempotent)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("zmesh")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


class Log:
    """A logger bound to a component (and optionally a proxy id and other context)."""

    def __init__(self, component: str, **context: Any) -> None:
        self._logger = logging.getLogger(f"zmesh.{component}")
        self.context = {"component": component, **context}

    def bind(self, **context: Any) -> Log:
        child = Log.__new__(Log)
        child._logger = self._logger
        child.context = {**self.context, **context}
        return child

    def _log(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, exc_info=exc_info,
                             extra={"fields": {**self.context, **fields}})

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, False, fields)

    def error(self, msg: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, msg, exc_info, fields)


class BurstLog:
    """Logs the first event of a burst per reason, then one summary with the count."""

    def __init__(self, log: Log, window: float = 5.0) -> None:
        self._log = log
        self._window = window
        self._bursts: dict[str, tuple[float, int]] = {}

    def event(self, reason: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        started, suppressed = self._bursts.get(reason, (0.0, -1))
        if suppressed >= 0 and now - started < self._window:
            self._bursts[reason] = (started, suppressed + 1)
            return
        if suppressed > 0:
            self._log.warning("suppressed repeats", reason=reason, count=suppressed)
        self._bursts[reason] = (now, 0)
        self._log.warning(msg, reason=reason, **fields)
