"""The Clone state machines without sockets: sync, gaps, tails, epochs, silence."""

from __future__ import annotations

import dataclasses

from bus import envelope as E
from bus.clone import Changed, CloneStore, CloneSubscriber, Phase, RequestSnapshot, Resync, Synced


class Wire:
    """Connects a CloneStore to subscribers by hand, so a test can lose any message."""

    def __init__(self) -> None:
        self.store = CloneStore()

    def publish(self, key: str, value: object = None, delete: bool = False) -> E.Envelope:
        env = self.store.stamp(E.make(key, E.DELETE if delete else E.UPDATE, value))
        prev = self.store.apply(env)
        return dataclasses.replace(env, prev=prev)

    def snapshot(self, prefix: str, req: RequestSnapshot) -> tuple[E.Envelope, list[E.Envelope]]:
        entries = list(self.store.subtree(prefix))
        head = self.store.snapshot_head(prefix, len(entries))
        head.req_id = req.req_id
        return head, entries


def synced(wire: Wire, prefix: str = "cfg/") -> CloneSubscriber:
    sub = CloneSubscriber(prefix)
    wire.store.subscribe(prefix)
    [req] = sub.on_message(wire.store.heartbeat(prefix), 0.0)
    assert isinstance(req, RequestSnapshot)
    actions = sub.on_snapshot(*wire.snapshot(prefix, req), 0.0)
    assert any(isinstance(a, Synced) for a in actions)
    return sub


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_waits_for_the_welcome_before_asking_for_a_snapshot() -> None:
    wire = Wire()
    wire.publish("cfg/a", 1)
    sub = CloneSubscriber("cfg/")
    assert sub.on_tick(0.0) == []
    assert sub.on_message(wire.publish("cfg/b", 2), 0.1) == []  # not subscribed yet: dropped
    wire.store.subscribe("cfg/")
    [req] = sub.on_message(wire.store.heartbeat("cfg/"), 0.2)
    assert isinstance(req, RequestSnapshot) and sub.phase is Phase.SNAPSHOT
    late = wire.publish("cfg/c", 3)  # published after the snapshot request was sent...
    head, entries = wire.snapshot("cfg/", req)
    assert sub.on_message(late, 0.3) == []  # ...buffered while the snapshot is pending
    actions = sub.on_snapshot(head, entries, 0.4)
    assert sorted(sub.state) == ["cfg/a", "cfg/b", "cfg/c"]
    assert sub.ready and sub.phase is Phase.LIVE
    assert "Synced" in kinds(actions)


def test_buffered_update_older_than_the_snapshot_is_not_applied_twice() -> None:
    wire = Wire()
    sub = CloneSubscriber("cfg/")
    wire.store.subscribe("cfg/")
    [req] = sub.on_message(wire.store.heartbeat("cfg/"), 0.0)
    early = wire.publish("cfg/a", 1)
    sub.on_message(early, 0.0)
    actions = sub.on_snapshot(*wire.snapshot("cfg/", req), 0.0)
    assert [a.key for a in actions if isinstance(a, Changed)] == ["cfg/a"]


def test_updates_apply_in_order_and_deletes_remove() -> None:
    wire = Wire()
    sub = synced(wire)
    actions = sub.on_message(wire.publish("cfg/a", 1), 1.0)
    assert actions == [Changed("cfg/a", sub.state["cfg/a"])]
    actions = sub.on_message(wire.publish("cfg/a", delete=True), 1.0)
    assert actions[0].deleted and "cfg/a" not in sub.state


def test_a_lost_update_is_a_gap_and_the_old_state_is_kept_until_resync() -> None:
    wire = Wire()
    sub = synced(wire)
    sub.on_message(wire.publish("cfg/a", 1), 1.0)
    wire.publish("cfg/b", 2)  # lost on the wire
    actions = sub.on_message(wire.publish("cfg/c", 3), 1.1)
    assert kinds(actions) == ["Resync", "RequestSnapshot"] and actions[0].cause == "gap"
    assert sorted(sub.state) == ["cfg/a"]  # still serving the last good state
    actions = sub.on_snapshot(*wire.snapshot("cfg/", actions[1]), 1.2)
    assert sorted(sub.state) == ["cfg/a", "cfg/b", "cfg/c"]
    assert {a.key for a in actions if isinstance(a, Changed)} == {"cfg/b", "cfg/c"}


def test_updates_outside_the_prefix_do_not_look_like_gaps() -> None:
    wire = Wire()
    wire.store.subscribe("other/")
    sub = synced(wire, "cfg/")
    for i in range(5):
        wire.publish(f"other/{i}", i)  # this subscriber never sees these
        assert isinstance(sub.on_message(wire.publish(f"cfg/{i}", i), 1.0)[0], Changed)
    assert sub.on_message(wire.store.heartbeat("cfg/"), 1.0) == []


def test_a_lost_tail_is_found_by_the_next_heartbeat() -> None:
    wire = Wire()
    sub = synced(wire)
    wire.publish("cfg/a", 1)  # lost, and nothing follows it
    actions = sub.on_message(wire.store.heartbeat("cfg/"), 2.0)
    assert actions[0] == Resync("tail-gap")


def test_a_heartbeat_older_than_the_state_is_not_a_tail_gap() -> None:
    wire = Wire()
    sub = synced(wire)
    stale = wire.store.heartbeat("cfg/")  # queued behind the update below
    sub.on_message(wire.publish("cfg/a", 1), 1.0)
    assert sub.on_message(stale, 1.1) == []


def test_a_new_epoch_resyncs_and_drops_keys_the_new_publisher_lacks() -> None:
    wire = Wire()
    sub = synced(wire)
    sub.on_message(wire.publish("cfg/old", 1), 1.0)
    restarted = Wire()  # kill -9 and restart: new epoch, fresh state
    restarted.store.subscribe("cfg/")
    restarted.publish("cfg/new", 2)
    actions = sub.on_message(restarted.store.heartbeat("cfg/"), 2.0)
    assert actions[0] == Resync("epoch")
    actions = sub.on_snapshot(*restarted.snapshot("cfg/", actions[1]), 2.1)
    assert sorted(sub.state) == ["cfg/new"]
    assert Changed("cfg/old", None, False) in actions
    assert sub.epoch == restarted.store.epoch


def test_silence_resyncs_once_the_publisher_is_heard_again() -> None:
    wire = Wire()
    sub = synced(wire)
    assert sub.on_tick(1.0) == []
    assert sub.on_tick(10.0) == [Resync("silence")]
    assert sub.phase is Phase.WAIT_WELCOME and sub.ready  # the last state is still served
    [req] = sub.on_message(wire.store.heartbeat("cfg/"), 11.0)
    assert isinstance(req, RequestSnapshot)


def test_snapshot_timeout_asks_again_and_ignores_the_stale_reply() -> None:
    wire = Wire()
    sub = CloneSubscriber("cfg/", silence_timeout=100, snapshot_timeout=1.0, jitter=lambda: 0.5)
    wire.store.subscribe("cfg/")
    [first] = sub.on_message(wire.store.heartbeat("cfg/"), 0.0)
    assert sub.on_tick(0.9) == []
    actions = sub.on_tick(1.1)
    assert actions[0] == Resync("snapshot-timeout")
    second = actions[1]
    assert second.req_id != first.req_id
    assert sub.on_snapshot(*wire.snapshot("cfg/", first), 1.6) == []
    assert not sub.ready
    assert sub.on_tick(2.9) == []  # the retry waits twice as long
    third = sub.on_tick(3.2)[1]
    assert sub.on_tick(6.9) == [] and sub.on_tick(7.3)[0] == Resync("snapshot-timeout")  # x4
    assert sub.on_snapshot(*wire.snapshot("cfg/", second), 7.4) == []
    assert third.req_id != second.req_id
    assert not sub.ready


def test_a_snapshot_that_failed_verification_is_not_applied() -> None:
    wire = Wire()
    sub = synced(wire)
    wire.publish("cfg/a", 1)
    actions = sub.on_message(wire.store.heartbeat("cfg/"), 1.0)
    actions = sub.on_snapshot(*wire.snapshot("cfg/", actions[1]), 1.1, valid=False)
    assert actions[0] == Resync("bad-snapshot") and sub.state == {}


def test_store_chains_only_cover_subscribed_prefixes() -> None:
    store = CloneStore()
    store.subscribe("cfg/")
    store.subscribe("cfg/p1")
    p = store.apply(store.stamp(E.make("cfg/p1", E.UPDATE, 1)))
    assert p == {"cfg/": 0, "cfg/p1": 0}
    p = store.apply(store.stamp(E.make("cfg/p2", E.UPDATE, 1)))
    assert p == {"cfg/": 1}
    store.unsubscribe("cfg/p1")
    p = store.apply(store.stamp(E.make("cfg/p1", E.UPDATE, 2)))
    assert p == {"cfg/": 2}
