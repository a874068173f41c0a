"""The NFQUEUE decider: a verdict and a mark for each new outbound connection (policy.py decides).

    meshctl decider --queue N --config FILE [--metrics-port P]

It must run in the pod's network namespace, as root (CAP_NET_ADMIN), and before traffic flows when
the rules were installed without `--queue-bypass`: then a queue nobody reads drops every new
connection (fail closed). With `--queue-bypass` such connections go direct, past the proxy (fail open).

FILE is a proxy config in pilot's schema (JSON, or YAML for any other suffix). It is re-read on
SIGHUP and whenever its mtime, size or inode changes (checked every second), so a writer should
replace it with a rename. A file that is missing or does not parse leaves the last good policy in
force; before the first one, every connection goes to the proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, start_http_server

from bus.logs import Log
from dataplane.init.policy import DestinationPolicy, Verdict, merged_marks

VERDICTS = Counter("zmesh_init_verdicts_total", "New outbound connections decided, by verdict", ["verdict"])
COPY_RANGE = 128  # bytes of each packet to copy up: the IP and TCP headers are all we read
QUEUE_MAXLEN = 4096
POLL_INTERVAL = 1.0

_log = Log("decider")


class ConfigWatch:
    """The policy from FILE, re-read when asked (SIGHUP) or when the file changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.policy = DestinationPolicy()
        self._seen: tuple[int, int, int] | None = None

    def poll(self, force: bool = False) -> DestinationPolicy:
        try:
            st = os.stat(self.path)
        except OSError:
            if self._seen is not None or force:
                _log.warning("config file missing", path=str(self.path), policy=self.policy.policy or "-")
                self._seen = None
            return self.policy
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen != self._seen or force:
            self._seen = seen
            self._load()
        return self.policy

    def _load(self) -> None:
        try:
            text = self.path.read_text()
            config: Any = json.loads(text) if self.path.suffix == ".json" else yaml.safe_load(text)
            if not isinstance(config, dict):
                raise ValueError("the file must hold one mapping (pilot's proxy config)")
            self.policy = DestinationPolicy.from_config(config)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            _log.error("cannot use config file", path=str(self.path), error=str(exc),
                       policy=self.policy.policy or "-")
            return
        _log.info("config loaded", path=str(self.path), policy=self.policy.policy,
                  version=config.get("version", ""), destinations=self.policy.count())


def decide(policy: DestinationPolicy, packet: Any) -> Verdict:
    """Give one queued packet (a netfilterqueue.Packet) its verdict: always accept, with our mark."""
    try:
        verdict = policy.decide_packet(packet.get_payload())
    except Exception:  # a packet held without a verdict would stall its connection
        _log.error("decision failed; sending the connection to the proxy", exc_info=True)
        verdict = Verdict.REDIRECT
    packet.set_mark(merged_marks(packet.get_mark(), verdict))
    packet.accept()
    VERDICTS.labels(verdict.value).inc()
    return verdict


def run(queue: int, config: Path, metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> None:
    """Serve queue `queue` until SIGTERM or SIGINT."""
    from netfilterqueue import NetfilterQueue

    watch = ConfigWatch(config)
    watch.poll(force=True)
    if metrics_port is not None:
        start_http_server(metrics_port, metrics_host)
    flags = {"stop": False, "hup": False}

    def on_signal(signum: int, _frame: object) -> None:
        flags["hup" if signum == signal.SIGHUP else "stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())  # a signal ends the select at once

    nfq = NetfilterQueue()
    nfq.bind(queue, lambda packet: decide(watch.policy, packet), max_len=QUEUE_MAXLEN, range=COPY_RANGE)
    fd = nfq.get_fd()
    _log.info("decider ready", queue=queue, metrics_port=metrics_port or "-")
    next_poll = time.monotonic() + POLL_INTERVAL
    try:
        while not flags["stop"]:
            readable, _, _ = select.select([fd, wake_r], [], [], POLL_INTERVAL)
            if fd in readable:
                nfq.run(block=False)
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while wake_r.recv(64):
                        pass
            if flags["hup"] or time.monotonic() >= next_poll:
                watch.poll(force=flags["hup"])
                flags["hup"] = False
                next_poll = time.monotonic() + POLL_INTERVAL
    finally:
        nfq.unbind()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
        _log.info("decider stopped", queue=queue)
