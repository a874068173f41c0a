"""Request/reply and reports over real CURVE sockets."""

from __future__ import annotations

import threading
import time

import pytest

from bus.keys import Keyring
from bus.reports import ReportCollector, ReportSender
from bus.rpc import AsyncRpcClient, RpcClient, RpcError, RpcServer, RpcTimeout
from tests.conftest import free_port, metric, wait_for


@pytest.fixture
def server(keydir, loops):
    loop = loops("rpc")
    calls: list = []

    def echo(req):
        calls.append(req)
        return {"echo": req.body, "peer": req.peer}

    def boom(req):
        raise ValueError("handler exploded")

    def slow(req):
        calls.append(req)
        time.sleep(0.4)
        return "slow-done"

    handlers = {"echo": echo, "boom": boom, "slow": slow}
    srv = loop.call_sync(lambda: RpcServer(loop, "tcp://127.0.0.1:*", Keyring(keydir, "pilot"), handlers))
    srv.calls = calls
    return srv


def client(keydir, endpoint, **kw) -> RpcClient:
    return RpcClient(endpoint, Keyring(keydir, "nodeagent"), "pilot", origin="nodeagent", **kw)


def test_a_call_is_answered_and_names_the_authenticated_peer(keydir, server) -> None:
    c = client(keydir, server.endpoint)
    try:
        assert c.call("echo", {"csr": "x"}) == {"echo": {"csr": "x"}, "peer": "nodeagent"}
    finally:
        c.close()


def test_a_handler_exception_is_an_error_reply_and_the_server_lives(keydir, server) -> None:
    c = client(keydir, server.endpoint)
    try:
        with pytest.raises(RpcError, match="ValueError: handler exploded"):
            c.call("boom")
        with pytest.raises(RpcError, match="unknown method"):
            c.call("nope")
        assert c.call("echo", 1)["echo"] == 1
    finally:
        c.close()


def test_a_retried_request_runs_once(keydir, server) -> None:
    c = client(keydir, server.endpoint, timeout=0.15, retries=5)
    retries = metric("zmesh_bus_rpc_retries_total")
    try:
        assert c.call("slow") == "slow-done"
    finally:
        c.close()
    assert metric("zmesh_bus_rpc_retries_total") > retries
    assert sum(1 for r in server.calls if r.method == "slow") == 1


def test_a_dead_server_times_out_after_bounded_retries(keydir) -> None:
    c = client(keydir, "tcp://127.0.0.1:9", timeout=0.1, retries=2)
    failures = metric("zmesh_bus_rpc_failures_total", reason="timeout")
    started = time.monotonic()
    try:
        with pytest.raises(RpcTimeout, match="3 attempts"):
            c.call("echo")
    finally:
        c.close()
    assert time.monotonic() - started < 2
    assert metric("zmesh_bus_rpc_failures_total", reason="timeout") == failures + 1


def test_concurrent_callers_share_a_client(keydir, server) -> None:
    c = client(keydir, server.endpoint)
    results: list = []
    threads = [threading.Thread(target=lambda i=i: results.append(c.call("echo", i)["echo"]))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    c.close()
    assert sorted(results) == list(range(8))


def test_reports_arrive_and_a_full_queue_drops_without_blocking(keydir, loops) -> None:
    loop = loops("collector")
    got: list = []
    collector = loop.call_sync(lambda: ReportCollector(
        loop, "tcp://127.0.0.1:*", Keyring(keydir, "pilot"), lambda t, v, o: got.append((t, v, o))))
    sender = ReportSender(collector.endpoint, Keyring(keydir, "proxy-a"), "pilot", origin="proxy-a")
    try:
        assert sender.send("telemetry", [{"requests": 1}])
        assert wait_for(lambda: got == [("telemetry", [{"requests": 1}], "proxy-a")])
    finally:
        sender.close()

    nobody = ReportSender("tcp://127.0.0.1:9", Keyring(keydir, "proxy-a"), "pilot", queue=10)
    dropped = metric("zmesh_bus_reports_dropped_total")
    started = time.monotonic()
    try:
        results = [nobody.send("telemetry", i) for i in range(100)]
    finally:
        nobody.close()
    assert time.monotonic() - started < 1  # it never blocked
    assert results.count(False) >= 80 and nobody.dropped == results.count(False)
    assert metric("zmesh_bus_reports_dropped_total") == dropped + results.count(False)


def async_client(keydir, loops, endpoint: str, **kw) -> AsyncRpcClient:
    loop = loops("rpc-client")
    return loop.call_sync(lambda: AsyncRpcClient(loop, endpoint, Keyring(keydir, "nodeagent"), "pilot",
                                                 origin="nodeagent", **kw))


def test_async_calls_answer_in_the_loop_without_blocking_it(keydir, loops, server) -> None:
    c = async_client(keydir, loops, server.endpoint)
    replies: list = []
    for i in range(50):  # all in flight at once: nothing waits for the one before
        c.call("echo", i, lambda result, error: replies.append((result, error, c.loop.in_loop())))
    assert wait_for(lambda: len(replies) == 50, timeout=10)
    assert sorted(r[0]["echo"] for r in replies) == list(range(50))
    assert all(error is None and in_loop for _, error, in_loop in replies)
    assert c.call_wait("echo", "x")["peer"] == "nodeagent"
    with pytest.raises(RpcError, match="handler exploded"):
        c.call_wait("boom")


def test_an_async_retry_is_answered_once_and_a_dead_server_times_out(keydir, loops, server) -> None:
    c = async_client(keydir, loops, server.endpoint, timeout=0.15, retries=4)
    retries = metric("zmesh_bus_rpc_retries_total")
    assert c.call_wait("slow") == "slow-done"  # 0.4 s handler: retried, run once, answered once
    assert metric("zmesh_bus_rpc_retries_total") > retries
    assert sum(1 for r in server.calls if r.method == "slow") == 1

    dead = async_client(keydir, loops, f"tcp://127.0.0.1:{free_port()}", timeout=0.1, retries=1)
    errors: list = []
    dead.call("echo", 1, lambda result, error: errors.append(error))
    assert wait_for(lambda: errors, timeout=5)
    assert isinstance(errors[0], RpcTimeout) and "after 2 attempts" in str(errors[0])
