"""The NFQUEUE decider: a verdict and a mark for each new outbound connection (policy.py decides).

    meshctl decider --queue N --config FILE [--metrics-port P]

It must run in the pod's network namespace, as root (CAP_NET_ADMIN), and before traffic flows when
the rules were installed without `--queue-bypass`: then a queue nobody reads drops every new
connection (fail closed). With `--queue-bypass` such connections go direct, past the proxy (fail open).

FILE is a proxy config in pilot's schema (JSON, or YAML for any other suffix). It is re-read on
SIGHUP and whenever its mtime, size or inode changes (checked every second), so a writer should
replace it with a rename. A file that is missing or does not parse leaves the last good policy in
force; before the first one, every connection goes to the proxy.

Fast path: once it has a config, the decider writes the same decisions into the mangle chain
ISTIO_KNOWN (policy.fast_path: known destinations REDIRECT, the rest the policy's verdict), so SYNs
are marked in the kernel and the queue, whose round trip through user space costs ~60 µs per SYN on
a busy 2-core box (mostly NFQUEUE's own; benchmarks/mesh.py), sees only those before the first
config. The chain outlives the decider: a dead decider leaves the last decisions in force, and only
unmarked SYNs meet --queue-bypass or fail closed. zmesh_init_verdicts_total adds the chain's
packet counters to the queue's counts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily

from bus.logs import Log
from dataplane.init import iptables, rules
from dataplane.init.policy import MARK_MASK, DestinationPolicy, Verdict, merged_marks


class VerdictCounts:
    """zmesh_init_verdicts_total{verdict}: plain ints bumped per queued packet, read only when scraped
    (a prometheus_client Counter's label lookup and lock cost more than the decision itself), plus the
    fast path's (`kernel`: the packet counters of its rules)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(Verdict, 0)
        self.kernel: Callable[[], dict[Verdict, int]] | None = None

    def collect(self) -> Any:
        family = CounterMetricFamily("zmesh_init_verdicts", "New outbound connections decided, by verdict",
                                     labels=["verdict"])
        kernel = self.kernel() if self.kernel is not None else {}
        for verdict, count in self.counts.items():
            family.add_metric([verdict.value], count + kernel.get(verdict, 0))
        yield family


VERDICTS = VerdictCounts()
REGISTRY.register(VERDICTS)
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
    VERDICTS.counts[verdict] += 1
    return verdict


class FastPath:
    """Keeps ISTIO_KNOWN (rules.py) in step with the policy, so SYNs get their verdict in the kernel.
    A failure leaves the queue deciding them (slower, same verdicts)."""

    def __init__(self) -> None:
        self._applied: dict[int, str] = {}
        self._policy: DestinationPolicy | None = None
        self._lock = threading.Lock()
        self._base = dict.fromkeys(Verdict, 0)  # counts of rule sets already replaced
        # set for each queued SYN: with a config in force that means the chain was emptied under us
        # (a re-install of the rules), so the next sync writes it again
        self.queued = False

    def sync(self, policy: DestinationPolicy) -> None:
        force, self.queued = self.queued and bool(policy.policy), False
        if policy is self._policy and not force:
            return
        self._policy = policy
        for family in (4, 6):
            specs = policy.fast_path(family)
            text = rules.known_text(specs)
            if text == self._applied.get(family, rules.known_text([])) and not (force and specs):
                continue  # never creates an empty chain
            with self._lock:
                if family in self._applied:
                    for verdict, n in self._read(family).items():
                        self._base[verdict] += n
                try:
                    iptables.restore(family, text)
                except iptables.IptablesError as exc:
                    if specs:
                        _log.warning("cannot update the fast path; the queue decides", family=f"ipv{family}",
                                     error=str(exc))
                    continue
                self._applied[family] = text
            _log.info("fast path updated", family=f"ipv{family}", rules=len(specs), policy=policy.policy)

    @staticmethod
    def _read(family: int) -> dict[Verdict, int]:
        """Packets each verdict's rules in ISTIO_KNOWN marked, from `iptables-save -c`."""
        counts = dict.fromkeys(Verdict, 0)
        try:
            text = iptables.save_counters(family, "mangle")
        except iptables.IptablesError:
            return counts
        marks = {f"--set-xmark {v.mark:#x}/{MARK_MASK:#x}": v for v in Verdict}
        for line in text.splitlines():
            if "-A ISTIO_KNOWN " not in line or not line.startswith("["):
                continue
            for needle, verdict in marks.items():
                if line.endswith(needle):
                    counts[verdict] += int(line[1:line.index(":")])
        return counts

    def counts(self) -> dict[Verdict, int]:
        with self._lock:
            out = dict(self._base)
            for family in self._applied:
                for verdict, n in self._read(family).items():
                    out[verdict] += n
        return out


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler, out of NetfilterQueue's blocking loop."""


def _watch(watch: ConfigWatch, fast: FastPath | None, wake: threading.Event, stop: threading.Event) -> None:
    """The config file, re-read on SIGHUP (`wake`) or when it changed, and the fast path after it."""
    while not stop.is_set():
        if fast is not None:
            fast.sync(watch.policy)
        asked = wake.wait(POLL_INTERVAL)
        wake.clear()
        if not stop.is_set():
            watch.poll(force=asked)


def run(queue: int, config: Path, metrics_port: int | None = None, metrics_host: str = "0.0.0.0",
        fast_path: bool = True) -> None:
    """Serve queue `queue` until SIGTERM or SIGINT; `fast_path` False leaves ISTIO_KNOWN alone (every
    SYN is decided here).

    The main thread sits in NetfilterQueue's blocking C loop: one recv per packet and no Python
    between packets (a select loop around `run(block=False)` cost more CPU per SYN). Signals reach it
    as EINTR; the helper threads (config watch, metrics) block them, so none is missed.
    """
    from netfilterqueue import NetfilterQueue

    watch = ConfigWatch(config)
    watch.poll(force=True)
    wake, stop = threading.Event(), threading.Event()
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

    def on_signal(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            raise _Stop
        wake.set()

    for sig in handled:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # inherited by the threads started now
    try:
        if metrics_port is not None:
            start_http_server(metrics_port, metrics_host)
        fast = FastPath() if fast_path else None
        VERDICTS.kernel = fast.counts if fast is not None else None
        threading.Thread(target=_watch, args=(watch, fast, wake, stop), name="config-watch",
                         daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)

    def on_packet(packet: Any) -> None:
        decide(watch.policy, packet)
        if fast is not None:
            fast.queued = True

    nfq = NetfilterQueue()
    nfq.bind(queue, on_packet, max_len=QUEUE_MAXLEN, range=COPY_RANGE)
    _log.info("decider ready", queue=queue, metrics_port=metrics_port or "-")
    try:
        nfq.run(block=True)
    except _Stop:
        pass
    finally:
        stop.set()
        wake.set()
        nfq.unbind()
        _log.info("decider stopped", queue=queue)
