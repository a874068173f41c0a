"""Reliable pub/sub over real CURVE sockets on loopback."""

from __future__ import annotations

import threading
import time

from bus import envelope as E
from tests.bus.helpers import fixed_endpoints, publisher, subscriber
from tests.conftest import metric, wait_for, wait_released


def test_snapshot_then_updates_then_deletes(keydir, loops) -> None:
    loop = loops("pub")
    pub = publisher(loop, keydir)
    for i in range(5):
        pub.set(f"cfg/a/{i}", {"i": i})
    pub.set("other/x", 1)
    changes: list = []
    sub = subscriber(loops("sub"), keydir, pub, prefix="cfg/a/", changes=changes)
    assert sub.wait_ready(5)
    assert sub.items() == {f"cfg/a/{i}": {"i": i} for i in range(5)}
    pub.set("cfg/a/9", "nine")
    pub.delete("cfg/a/0")
    pub.set("other/y", 2)
    assert wait_for(lambda: sub.get("cfg/a/9") == "nine" and sub.get("cfg/a/0") is None)
    assert ("cfg/a/0", None) in changes
    assert "other/y" not in sub.items()


def test_ten_thousand_ordered_updates_none_lost(keydir, loops) -> None:
    pub = publisher(loops("pub"), keydir)
    pub.set("cfg/seed", 0)
    seen: list[int] = []
    sub = subscriber(loops("sub"), keydir, pub, changes=None,
                     on_change=lambda k, v: seen.append(v) if k == "cfg/n" else None)
    assert sub.wait_ready(5)
    resyncs = sub.resyncs
    for i in range(10_000):
        pub.set("cfg/n", i)
        if i % 1000 == 999:  # let the bounded pipes drain, as a producer at this rate would
            wait_for(lambda i=i: seen and seen[-1] == i, timeout=10)
    assert wait_for(lambda: len(seen) == 10_000, timeout=20), len(seen)
    assert seen == list(range(10_000))
    assert sub.resyncs == resyncs  # nothing was lost, so nothing needed a re-snapshot


def test_slow_joiners_lose_nothing(keydir, loops) -> None:
    """Subscribers join while the publisher writes as fast as it can."""
    pub = publisher(loops("pub"), keydir)
    stop = threading.Event()
    written = {"n": 0}

    def writer() -> None:
        while not stop.is_set() and written["n"] < 20_000:
            pub.set(f"cfg/k{written['n'] % 200}", written["n"])
            written["n"] += 1
            if written["n"] % 50 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        subs = []
        for i in range(8):
            time.sleep(0.05)
            subs.append(subscriber(loops(f"sub{i}"), keydir, pub, name="proxy-b"))
    finally:
        time.sleep(0.2)
        stop.set()
        t.join(10)
    # the publisher may still be signing the writer's backlog
    final = pub.loop.call_sync(lambda: {k: e.value() for k, e in pub.store.entries.items()}, timeout=60)
    for sub in subs:
        assert wait_for(lambda sub=sub: sub.items() == final, timeout=30), sub.machine.phase


def test_a_forced_gap_is_detected_and_repaired(keydir, loops) -> None:
    pub = publisher(loops("pub"), keydir)
    sub = subscriber(loops("sub"), keydir, pub)
    assert sub.wait_ready(5)
    gaps = metric("zmesh_bus_sequence_gaps_total")

    def lose(key: str, value: object) -> None:
        """Record an update exactly as a publish would, but never put it on the wire."""
        env = pub.store.stamp(E.make(key, E.UPDATE, value))
        pub.store.apply(pub.signer.sign(env))

    pub.loop.call_sync(lambda: lose("cfg/lost", 1))
    pub.set("cfg/after", 2)
    assert wait_for(lambda: sub.get("cfg/lost") == 1 and sub.get("cfg/after") == 2, timeout=5)
    assert metric("zmesh_bus_sequence_gaps_total") == gaps + 1
    assert metric("zmesh_bus_resnapshots_total", cause="gap") >= 1

    pub.loop.call_sync(lambda: lose("cfg/tail", 3))  # nothing follows: the heartbeat tells
    assert wait_for(lambda: sub.get("cfg/tail") == 3, timeout=5)
    assert metric("zmesh_bus_resnapshots_total", cause="tail-gap") >= 1


def test_a_subscriber_past_its_high_water_mark_recovers_without_blocking_anyone(keydir, loops) -> None:
    pub = publisher(loops("pub"), keydir, hwm=1000)
    fast_seen: list[int] = []
    fast = subscriber(loops("fast"), keydir, pub, name="proxy-a",
                      on_change=lambda k, v: fast_seen.append(v) if k == "cfg/n" else None)
    slow_loop = loops("slow")
    slow = subscriber(slow_loop, keydir, pub, name="proxy-b", hwm=100)
    assert fast.wait_ready(5) and slow.wait_ready(5)
    resyncs = slow.resyncs
    # The slow one stops reading until the publisher is done: a sleep of fixed length let a loaded
    # machine's slow publisher finish after the subscriber woke, so nothing overflowed.
    release = threading.Event()
    released: list[bool] = []
    slow_loop.call_soon_threadsafe(lambda: released.append(release.wait(60)))
    for i in range(3000):
        pub.set("cfg/n", i)
        pub.set(f"cfg/k{i % 50}", {"i": i, "pad": "x" * 2000})  # ~12 MB: past every buffer and HWM
        if i % 500 == 499:
            assert wait_for(lambda i=i: fast_seen and fast_seen[-1] == i, timeout=10)
    release.set()
    # had the stuck subscriber held the publisher up, the loop above would have outlasted the wait
    assert wait_for(lambda: released == [True], timeout=10), "the publisher was held up"
    assert wait_for(lambda: len(fast_seen) == 3000, timeout=10)
    assert fast_seen == list(range(3000))  # the fast subscriber lost nothing
    final = pub.loop.call_sync(lambda: {k: e.value() for k, e in pub.store.entries.items()})
    assert wait_for(lambda: slow.items() == final, timeout=10)
    assert slow.resyncs > resyncs


def test_silence_keeps_the_last_state_and_resyncs_with_a_new_publisher(keydir, loops) -> None:
    pub_loop = loops("pub")
    endpoints = fixed_endpoints()
    pub = publisher(pub_loop, keydir, **endpoints)
    pub.set("cfg/a", 1)
    pub.set("cfg/gone", 1)
    sub = subscriber(loops("sub"), keydir, pub)
    assert sub.wait_ready(5)
    pub_loop.stop()  # the publisher vanishes
    assert wait_for(lambda: metric("zmesh_bus_resnapshots_total", cause="silence") >= 1, timeout=5)
    assert sub.items() == {"cfg/a": 1, "cfg/gone": 1}  # still served
    wait_released(*endpoints.values())
    new = publisher(loops("pub2"), keydir, **endpoints)
    new.set("cfg/a", 2)
    assert wait_for(lambda: sub.items() == {"cfg/a": 2}, timeout=10)
