"""The RPC rules without sockets or clocks: retries, timeouts, reply matching, the server's checks."""

from __future__ import annotations

import itertools

import pytest

from bus import envelope as E
from bus.envelope import DecodeError
from bus.rpc_core import Done, RpcCalls, RpcError, RpcTimeout, Send, ServedReplies, parse_request


def calls(**kw) -> RpcCalls:
    ids = (n.to_bytes(8, "big") for n in itertools.count(1))
    return RpcCalls("nodeagent", kw.pop("timeout", 1.0), kw.pop("retries", 2), new_id=lambda: next(ids),
                    target="tcp://pilot", **kw)


def reply(send: Send, value: object = "ok", kind: str = E.REPLY) -> list[bytes]:
    return E.make(send.method, kind, value, req_id=send.req_id).frames()


def test_a_reply_ends_the_call_and_a_late_duplicate_is_dropped() -> None:
    c = calls()
    send = c.start("csr", {"pem": "x"}, now=0.0)
    req = E.decode(send.frames)
    assert (send.attempt, req.kind, req.topic, req.value(), req.origin) == (0, E.REQUEST, "csr", {"pem": "x"},
                                                                           "nodeagent")
    assert c.on_reply(reply(send, {"cert": "y"})) == Done(send.req_id, "csr", {"cert": "y"}, None)
    assert len(c) == 0 and c.next_deadline() is None
    assert c.on_reply(reply(send, {"cert": "y"})) is None  # the retry's answer, after the first
    assert c.tick(100.0) == []


def test_a_timed_out_attempt_is_resent_with_the_same_id_then_given_up() -> None:
    c = calls(timeout=1.0, retries=2)
    send = c.start("csr", None, now=10.0)
    assert c.next_deadline() == 11.0
    assert c.tick(10.99) == []
    retry = c.tick(11.0)
    assert retry == [Send(send.req_id, "csr", send.frames, 1)]
    assert c.next_deadline() == 12.0
    assert c.tick(12.5) == [Send(send.req_id, "csr", send.frames, 2)]
    assert c.next_deadline() == 13.5
    [done] = c.tick(13.5, last_error="server refused our CURVE key")
    assert isinstance(done, Done) and not done.replied and isinstance(done.error, RpcTimeout)
    assert str(done.error) == "csr to tcp://pilot: no reply after 3 attempts (server refused our CURVE key)"
    assert len(c) == 0
    assert c.on_reply(reply(send)) is None  # the server answered after we gave up


def test_a_reply_to_a_retried_attempt_still_ends_the_call() -> None:
    c = calls(retries=1)
    send = c.start("m", None, now=0.0)
    [again] = c.tick(1.0)
    assert again.req_id == send.req_id
    assert c.on_reply(reply(send, 7)).value == 7


def test_per_call_timeout_and_retries_override_the_defaults() -> None:
    c = calls(timeout=5.0, retries=3)
    c.start("m", None, now=0.0, timeout=0.5, retries=0)
    [done] = c.tick(0.5)
    assert isinstance(done.error, RpcTimeout) and "1 attempts" in str(done.error)


def test_calls_in_flight_are_matched_by_id_and_time_out_independently() -> None:
    c = calls(timeout=1.0, retries=0)
    a = c.start("a", None, now=0.0, context="cb-a")
    b = c.start("b", None, now=0.5, context="cb-b")
    assert c.on_reply(reply(b, "B")) == Done(b.req_id, "b", "B", None, context="cb-b")
    [done] = c.tick(1.0)
    assert (done.req_id, done.context, type(done.error)) == (a.req_id, "cb-a", RpcTimeout)


def test_an_error_reply_is_an_rpc_error_with_the_servers_code() -> None:
    c = calls()
    send = c.start("csr", None, now=0.0)
    done = c.on_reply(reply(send, {"error": "not_owner", "detail": "sa/x is not yours"}, E.ERROR))
    assert isinstance(done.error, RpcError) and done.error.code == "not_owner"
    assert str(done.error) == "not_owner: sa/x is not yours"
    send = c.start("csr", None, now=0.0)
    done = c.on_reply(reply(send, "not a dict", E.ERROR))
    assert (done.error.code, str(done.error)) == ("error", "error")


@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b"csr", b"\xc1", b""],
    [],
])
def test_garbage_is_dropped_and_the_call_keeps_waiting(frames: list[bytes]) -> None:
    c = calls()
    send = c.start("csr", None, now=0.0)
    assert c.on_reply(frames) is None
    assert len(c) == 1
    assert c.on_reply(reply(send)).value == "ok"


def test_a_frame_set_with_our_id_but_not_a_reply_does_not_end_the_call() -> None:
    c = calls()
    send = c.start("csr", None, now=0.0)
    assert c.on_reply(reply(send, None, E.REQUEST)) is None  # an echo of our own request
    assert len(c) == 1
    assert c.on_reply(reply(send)).value == "ok"


def test_a_reply_whose_body_cannot_be_decoded_fails_the_call() -> None:
    c = calls()
    send = c.start("csr", None, now=0.0)
    frames = E.make("csr", E.REPLY, body=b"\xc1", req_id=send.req_id).frames()
    done = c.on_reply(frames)
    assert isinstance(done.error, RpcError) and "undecodable reply" in str(done.error)


def test_a_reply_over_the_body_limit_is_dropped() -> None:
    c = calls(max_body=16)
    send = c.start("csr", None, now=0.0)
    assert c.on_reply(reply(send, "x" * 100)) is None
    assert c.on_reply(reply(send, "x")).value == "x"


def test_forget_drops_a_call_or_all() -> None:
    c = calls()
    a = c.start("a", None, now=0.0)
    c.start("b", None, now=0.0)
    c.forget(a.req_id)
    assert c.on_reply(reply(a)) is None and len(c) == 1
    c.forget()
    assert len(c) == 0 and c.tick(99.0) == []


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RpcCalls(timeout=0)
    with pytest.raises(ValueError):
        RpcCalls(retries=-1)


# -- server --

def test_the_server_accepts_requests_only() -> None:
    req = E.make("csr", E.REQUEST, {"pem": "x"}, req_id=b"12345678").frames()
    incoming = parse_request(b"client-1", req)
    assert incoming.request.topic == "csr" and incoming.cache_key == (b"client-1", b"12345678")
    with pytest.raises(DecodeError) as bad:
        parse_request(b"client-1", E.make("csr", E.REPLY, 1, req_id=b"12345678").frames())
    assert bad.value.reason == "bad_kind"
    with pytest.raises(DecodeError) as bad:
        parse_request(b"client-1", E.make("csr", E.REQUEST, 1).frames())  # no id: cannot be answered
    assert bad.value.reason == "bad_kind"
    with pytest.raises(DecodeError):
        parse_request(b"client-1", [b"x", b"\xc1", b""])


def test_served_replies_answer_a_retry_and_forget_the_oldest() -> None:
    served = ServedReplies(size=2)
    served.put((b"c", b"1"), [b"r1"])
    served.put((b"c", b"2"), [b"r2"])
    assert served.get((b"c", b"1")) == [b"r1"]
    assert served.get((b"other", b"1")) is None  # ids are per client
    served.put((b"c", b"3"), [b"r3"])
    assert served.get((b"c", b"1")) is None and served.get((b"c", b"3")) == [b"r3"]
