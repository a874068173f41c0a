"""Worker processes for `bus_fanout.py`: each hosts many subscriber sockets and timestamps applies.

Workers are started with the "spawn" method, so this module must be importable on its own and
must not touch a zmq context at import time. A worker talks to the parent through two channels:
a Pipe (parent -> worker: "stop") and a shared Queue (worker -> parent: ready / done / result /
error messages). Apply times are `time.monotonic()`, which on Linux is the system-wide
CLOCK_MONOTONIC and so comparable with the publisher's timestamps in the parent process.
"""

from __future__ import annotations

import cProfile
import os
import resource
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from typing import Any

PREFIX = "cfg/bench/"
SEED = -1  # the index of the value present before any subscriber joins (and of raw hellos)


def raise_nofile() -> None:
    """Thousands of sockets need thousands of descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Recorder:
    """Per update index: the latest apply time among this worker's subscribers, and how many applied.

    Tells the parent as soon as every local subscriber has applied an index, so the parent can pace
    updates on completion instead of guessing a safe interval.
    """

    def __init__(self, wid: int, n_subs: int, results: Queue) -> None:
        self.wid = wid
        self.n_subs = n_subs
        self.results = results
        self.times: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def applied(self, i: int) -> None:
        now = time.monotonic()
        if now > self.times.get(i, 0.0):
            self.times[i] = now
        n = self.counts.get(i, 0) + 1
        self.counts[i] = n
        if n == self.n_subs and i != SEED:
            self.results.put(("done", self.wid, i))

    def payload(self) -> dict[str, Any]:
        return {"times": dict(self.times), "counts": dict(self.counts)}


def run_worker(kind: str, wid: int, cfg: dict[str, Any], conn: Connection, results: Queue) -> None:
    """Process entry point: build `kind` subscribers, report ready, record until told to stop."""
    raise_nofile()
    from bus import logs

    logs.configure("WARNING")  # handshake failures and dropped messages, one line each
    try:
        {"zmesh": _zmesh_worker, "relay": _relay_worker, "raw": _raw_worker}[kind](
            wid, cfg, conn, results)
    except BaseException:
        results.put(("error", wid, traceback.format_exc()))
        raise
    finally:
        results.close()
        results.join_thread()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _await_stop(conn: Connection, deadline: float) -> None:
    """Block until the parent says stop (or the pipe closes, or the hard deadline passes)."""
    while _remaining(deadline) > 0:
        try:
            if conn.poll(min(0.5, _remaining(deadline))) and conn.recv() == "stop":
                return
        except (EOFError, OSError):
            return  # the parent is gone


def _value_index(value: Any) -> int | None:
    if isinstance(value, dict) and isinstance(value.get("i"), int):
        return value["i"]
    return None


# -- zmesh and relay: bus.pubsub subscribers on one bus.loop.Loop per worker --

def _profiler(path: str | None) -> cProfile.Profile | None:
    """CPU time of one thread, not wall time: on 2 shared cores, wall time would mostly measure
    waiting for a core."""
    return cProfile.Profile(time.thread_time) if path else None


def bus_counters() -> dict[str, dict[str, float]]:
    """This process's resync causes and CURVE handshake failures, from the bus's own metrics."""
    from bus.metrics import AUTH_FAILURES, RESNAPSHOTS

    out: dict[str, dict[str, float]] = {}
    wanted = (("resyncs", RESNAPSHOTS, "cause"), ("auth_failures", AUTH_FAILURES, "reason"))
    for name, metric, label in wanted:
        out[name] = {s.labels[label]: s.value for m in metric.collect() for s in m.samples
                     if s.name.endswith("_total") and s.value}
    return out


def _bus_worker(wid: int, cfg: dict[str, Any], conn: Connection, results: Queue,
                build: Any) -> None:
    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.signing import Verifier

    deadline = cfg["deadline"]
    keyring = Keyring(cfg["keydir"], cfg["keyname"])
    verifier = Verifier(keyring.trusted_signers())  # one per process: it caches verifications
    recorder = Recorder(wid, cfg["n_subs"], results)

    def on_change(_key: str, value: Any) -> None:
        i = _value_index(value)
        if i is not None:
            recorder.applied(i)

    loop = Loop(f"w{wid}")
    subs, stats = build(loop, keyring, verifier, on_change)  # before the loop runs: no call_sync
    prof = _profiler(cfg.get("profile"))
    loop.start()
    try:
        for sub in subs:
            if not sub.wait_ready(_remaining(deadline)):
                raise TimeoutError(f"worker {wid}: subscriber {sub.name} not synced by the deadline")
        at_ready = loop.call_sync(lambda: (sum(s.resyncs for s in subs) + stats(), bus_counters()))
        if prof is not None:
            loop.call_sync(prof.enable)  # the loop thread, from now on: not the join
        results.put(("ready", wid, {"subs": len(subs), "pid": os.getpid()}))
        _await_stop(conn, deadline)
        if prof is not None:
            loop.call_sync(prof.disable)
            prof.dump_stats(cfg["profile"])
        payload = loop.call_sync(recorder.payload, timeout=10)
        resyncs = loop.call_sync(lambda: sum(s.resyncs for s in subs) + stats(), timeout=10)
        payload.update(setup_resyncs=at_ready[0], resyncs=resyncs - at_ready[0],
                       setup_counters=at_ready[1], counters=bus_counters())
        results.put(("result", wid, payload))
    finally:
        loop.stop()


def _zmesh_worker(wid: int, cfg: dict[str, Any], conn: Connection, results: Queue) -> None:
    from bus.pubsub import Subscriber

    def build(loop: Any, keyring: Any, verifier: Any, on_change: Any) -> tuple[list, Any]:
        subs = [Subscriber(loop, pub_endpoint=cfg["pub"], snapshot_endpoint=cfg["snapshot"],
                           prefix=PREFIX, keyring=keyring, server="pilot", verifier=verifier,
                           on_change=on_change, name=f"w{wid}-s{j}", monitor=True)
                for j in range(cfg["n_subs"])]
        return subs, lambda: 0

    _bus_worker(wid, cfg, conn, results, build)


def _relay_worker(wid: int, cfg: dict[str, Any], conn: Connection, results: Queue) -> None:
    """One relay (tcp+CURVE upstream, ipc downstream) and its local subscribers, like a node agent."""
    from bus.pubsub import Subscriber
    from bus.relay import Relay

    def build(loop: Any, keyring: Any, verifier: Any, on_change: Any) -> tuple[list, Any]:
        relay = Relay(loop, upstream_pub=cfg["pub"], upstream_snapshot=cfg["snapshot"], server="pilot",
                      prefix="cfg/", keyring=keyring, verifier=verifier,
                      local_pub=f"ipc://{cfg['ipcdir']}/r{wid}-pub",
                      local_snapshot=f"ipc://{cfg['ipcdir']}/r{wid}-snap", name=f"relay{wid}")
        subs = [Subscriber(loop, pub_endpoint=relay.local_pub, snapshot_endpoint=relay.local_snapshot,
                           prefix=PREFIX, keyring=None, server="pilot", verifier=verifier,
                           on_change=on_change, name=f"r{wid}-s{j}", monitor=True)
                for j in range(cfg["n_subs"])]
        return subs, lambda: relay.subscriber.resyncs

    _bus_worker(wid, cfg, conn, results, build)


# -- raw: plain pyzmq SUB sockets with CURVE, one Poller per worker --

def _raw_worker(wid: int, cfg: dict[str, Any], conn: Connection, results: Queue) -> None:
    """The baseline: what the same fan-out costs with no protocol on top of ZeroMQ + CURVE."""
    import msgpack
    import zmq

    from bus.keys import Keyring

    deadline = cfg["deadline"]
    keyring = Keyring(cfg["keydir"], cfg["keyname"])
    mine = keyring.curve()
    server_key = keyring.curve_public("pilot")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 16384)
    recorder = Recorder(wid, cfg["n_subs"], results)
    prof = _profiler(cfg.get("profile"))
    socks: list[zmq.Socket] = []
    try:
        poller = zmq.Poller()
        for _ in range(cfg["n_subs"]):
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            s.curve_secretkey = mine.secret
            s.curve_publickey = mine.public
            s.curve_serverkey = server_key
            s.setsockopt(zmq.SUBSCRIBE, PREFIX.encode())
            s.connect(cfg["pub"])
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        poller.register(conn.fileno(), zmq.POLLIN)
        heard: set[zmq.Socket] = set()
        ready = False
        while _remaining(deadline) > 0:
            events = poller.poll(min(500.0, _remaining(deadline) * 1000))
            stop = False
            for sock, _ in events:
                if not isinstance(sock, zmq.Socket):
                    try:
                        stop = conn.recv() == "stop"
                    except (EOFError, OSError):
                        stop = True
                    continue
                while True:
                    try:
                        _topic, body = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    i = _value_index(msgpack.unpackb(body, raw=False))
                    if i is not None:
                        recorder.applied(i)
                    if not ready:
                        heard.add(sock)
            if not ready and len(heard) == len(socks):
                ready = True
                if prof:
                    prof.enable()
                results.put(("ready", wid, {"subs": len(socks), "pid": os.getpid()}))
            if stop:
                break
        if prof:
            prof.disable()
            prof.dump_stats(cfg["profile"])
        results.put(("result", wid, {**recorder.payload(), "resyncs": 0}))
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
