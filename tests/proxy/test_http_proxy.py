"""The L7 path on real loopback sockets: HttpConnection (server.py) and its upstream pools
(upstream.py) with a Runtime on a reactor thread, tiny threaded backends, raw-socket clients.

Configs follow pilot's schema: built by hand for single features, or translated by pilot from
Istio resources (bookinfo) with the endpoints pointed at local backends.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy.http.codec import NEED_DATA
from dataplane.proxy.http.options import HttpOptions
from dataplane.proxy.http.state import http_state
from dataplane.proxy.stats import LABELS
from tests.conftest import free_port, wait_for
from tests.pilot.test_translation import config as pilot_config
from tests.pilot.test_translation import files, host
from tests.proxy.l7helpers import (
    CLUSTER,
    Backend,
    Client,
    Proxy,
    Seen,
    cluster_spec,
    endpoint,
    make_config,
    reply,
    request_bytes,
    route,
)

SERVICE = "svc.default.svc.cluster.local"
Backends = list[Backend]
Proxies = list[Proxy]


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made: list[Backend] = []
    yield made
    for b in made:
        b.close()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for p in made:
        p.close()


def start(backends: Backends, proxies: Proxies, *handlers: Any,
          routes: list[dict[str, Any]] | None = None, cluster: dict[str, Any] | None = None,
          **kw: Any) -> tuple[Proxy, list[Backend]]:
    """Backends for `handlers` as the endpoints of CLUSTER, and a proxy routing everything there."""
    bs = [Backend(h, name=b"b%d" % i) for i, h in enumerate(handlers or (None,))]
    backends.extend(bs)
    spec = cluster_spec(**(cluster or {}))
    cfg = make_config(routes, clusters={CLUSTER: spec}, endpoints={CLUSTER: [b.address for b in bs]})
    proxy = Proxy(cfg, **kw)
    proxies.append(proxy)
    return proxy, bs


# --- basics ----------------------------------------------------------------------------------------


def test_get_and_post_with_content_length_and_chunked(backends: Backends, proxies: Proxies) -> None:
    def handler(_conn: socket.socket, seen: Seen) -> bytes:
        if seen.target == b"/chunked":
            return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
        return reply(200, b"echo:" + seen.body)

    proxy, [b] = start(backends, proxies, handler)
    c = Client(proxy.port)
    r = c.request("GET", "/a", headers=[("Connection", "keep-alive, x-hop"), ("x-hop", "1"),
                                        ("TE", "trailers")])
    assert (r.status, r.body) == (200, b"echo:")
    assert int(r.headers[b"x-envoy-upstream-service-time"]) >= 0
    seen = b.seen[-1]
    assert seen.headers[b"x-forwarded-proto"] == b"http" and len(seen.headers[b"x-request-id"]) == 36
    assert b"x-hop" not in seen.headers and b"te" not in seen.headers and b"connection" not in seen.headers
    r = c.request("POST", "/p", body=b"x" * 1000)
    assert (r.status, r.body) == (200, b"echo:" + b"x" * 1000)
    c.send(b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    r = c.response("POST")
    assert (r.status, r.body) == (200, b"echo:abcdefg")
    assert b.seen[-1].headers[b"transfer-encoding"] == b"chunked"
    r = c.request("GET", "/chunked")
    assert (r.status, r.body) == (200, b"hello world")
    assert r.headers[b"transfer-encoding"] == b"chunked"
    assert b.accepted == 1  # one keep-alive upstream connection for all of it
    c.close()


def test_keep_alive_and_pipelining_answer_in_order(backends: Backends, proxies: Proxies) -> None:
    proxy, [b] = start(backends, proxies, lambda _c, s: reply(200, s.target))
    c = Client(proxy.port)
    c.send(b"".join(request_bytes("GET", f"/{i}") for i in range(20)))
    assert [c.response().body for _ in range(20)] == [f"/{i}".encode() for i in range(20)]
    assert c.request("HEAD", "/h").status == 200
    assert c.request("GET", "/after").body == b"/after"
    assert b.accepted == 1
    c.close()


def test_expect_100_continue_is_answered_by_the_proxy(backends: Backends, proxies: Proxies) -> None:
    proxy, [b] = start(backends, proxies, lambda _c, s: reply(200, b"got:" + s.body))
    c = Client(proxy.port)
    c.send(b"PUT /u HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert c.sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    r = c.response("PUT")
    assert (r.status, r.body) == (200, b"got:hello")
    assert b"expect" not in b.seen[-1].headers
    c.close()


def test_upgrade_is_tunnelled_after_101(backends: Backends, proxies: Proxies) -> None:
    def websocket(conn: socket.socket, seen: Seen) -> None:
        assert seen.headers[b"upgrade"] == b"websocket" and seen.headers[b"connection"] == b"upgrade"
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                     b"server-first")
        while data := conn.recv(65536):
            conn.sendall(data.upper())

    proxy, _ = start(backends, proxies, websocket)
    c = Client(proxy.port)
    c.send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    r = c.response()
    assert r.status == 101 and r.headers[b"upgrade"] == b"websocket"
    got = b""  # bytes that came with the 101
    while (ev := c.parser.next_event()) is not NEED_DATA:
        got += getattr(ev, "data", b"")
    c.send(b"ping")
    deadline = time.monotonic() + 5
    while len(got) < len(b"server-firstPING") and time.monotonic() < deadline:
        got += c.sock.recv(100)
    assert got == b"server-firstPING"
    big = bytes(range(256)) * 4096  # 1 MiB each way, through the back-pressure path
    threading.Thread(target=c.sock.sendall, args=(big,), daemon=True).start()
    received = bytearray()
    while len(received) < len(big) and time.monotonic() < deadline + 10:
        received += c.sock.recv(1 << 16)
    assert bytes(received) == big.upper()
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed()
    assert wait_for(lambda: ("svc.default.svc.cluster.local", "101", "-") in proxy.requests())


def test_slowloris_gets_408_and_other_clients_are_served(backends: Backends, proxies: Proxies) -> None:
    proxy, _ = start(backends, proxies, options=HttpOptions(request_headers_timeout=0.5))
    slow = Client(proxy.port)
    slow.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ")
    fast = Client(proxy.port)
    started = time.monotonic()
    for i in range(20):
        slow.send(b"a")
        assert fast.request("GET", f"/{i}").status == 200
    assert time.monotonic() - started < 0.5  # nobody waited on the slow client
    slow.sock.settimeout(3)
    data = slow.sock.recv(1000)
    assert data.startswith(b"HTTP/1.1 408 ") and b"connection: close" in data
    assert slow.closed() and fast.request().status == 200


def test_huge_header_gets_431_and_bad_request_400(backends: Backends, proxies: Proxies) -> None:
    proxy, [b] = start(backends, proxies)
    c = Client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    r = c.response()
    assert r.status == 431 and r.headers[b"connection"] == b"close"
    assert c.closed()
    c = Client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: svc\r\nBad Header: x\r\n\r\n")
    assert c.response().status == 400 and c.closed()
    assert b.seen == []


def test_backend_reset_mid_response_closes_the_client(backends: Backends, proxies: Proxies) -> None:
    def half(conn: socket.socket, seen: Seen) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.05)
        if seen.target == b"/rst":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    proxy, _ = start(backends, proxies, half)
    for path, flag in (("/rst", "UR"), ("/fin", "UC")):
        c = Client(proxy.port)
        c.send(request_bytes("GET", path))
        c.sock.settimeout(3)
        got = b""
        with pytest.raises(ConnectionError):
            while data := c.sock.recv(65536):
                got += data
            raise ConnectionResetError
        assert got.startswith(b"HTTP/1.1 200 OK") and len(got) < 100_000
        assert wait_for(lambda f=flag: (SERVICE, "200", f) in proxy.requests()), proxy.requests()


# --- retries, outliers, circuit breakers ---------------------------------------------------------


def test_retries_succeed_on_another_endpoint(backends: Backends, proxies: Proxies) -> None:
    retries = {"attempts": 3, "per_try_timeout_ms": 0, "retry_on": ["5xx", "connect-failure"],
               "retriable_status_codes": [], "backoff_ms": 1}
    bad = Backend(lambda _c, _s: reply(503, b"bad"), name=b"bad")
    good = Backend(name=b"good")
    backends += [bad, good]
    refused = endpoint(free_port())
    cfg = make_config([route(retries=retries)],
                      clusters={CLUSTER: cluster_spec(lb={"simple": "ROUND_ROBIN"})},
                      endpoints={CLUSTER: [bad.address, refused, good.address]})
    proxy = Proxy(cfg)
    proxies.append(proxy)
    c = Client(proxy.port)
    attempts = Counter()
    for _ in range(30):
        r = c.request()
        assert (r.status, r.body) == (200, b"good")
        attempts[r.headers.get(b"x-envoy-attempt-count", b"1")] += 1
    assert set(attempts) <= {b"1", b"2", b"3"} and attempts[b"1"] < 30
    retried = [s for s in good.seen if b"x-envoy-attempt-count" in s.headers]
    assert retried and all(int(s.headers[b"x-envoy-attempt-count"]) > 1 for s in retried)
    assert proxy.requests() == {(SERVICE, "200", "-"): 30}
    # all tries fail: the last 503 goes back with URX
    bad2 = Backend(lambda _c, _s: reply(503, b"bad"), name=b"bad2")
    backends.append(bad2)
    proxy.apply(make_config([route(retries=retries)], endpoints={CLUSTER: [bad2.address]}, version="v2"))
    r = c.request()
    assert r.status == 503 and r.headers[b"x-envoy-attempt-count"] == b"4"
    assert (SERVICE, "503", "URX") in proxy.requests()


def test_no_healthy_upstream_connect_failure_and_no_route(backends: Backends, proxies: Proxies) -> None:
    dead, empty = (f"outbound|80||{name}.default.svc.cluster.local" for name in ("dead", "empty"))
    vhosts = [{"name": "svc:80", "domains": ["svc"], "routes": [route()]},
              {"name": "dead:80", "domains": ["dead"], "routes": [route(dead)]},
              {"name": "empty:80", "domains": ["empty"], "routes": [route(empty)]}]
    clusters = {CLUSTER: cluster_spec(), dead: cluster_spec(dead), empty: cluster_spec(empty)}
    proxy = Proxy(make_config(vhosts=vhosts, clusters=clusters,
                              endpoints={CLUSTER: [endpoint(free_port())], dead: [endpoint(free_port())]}))
    proxies.append(proxy)
    c = Client(proxy.port)
    r = c.request(host="nowhere")
    assert r.status == 404
    r = c.request(host="empty")
    assert (r.status, r.body) == (503, b"no healthy upstream")
    r = c.request(host="dead")
    assert r.status == 503 and b"connection failure" in r.body and b"connection_refused" in r.body
    got = proxy.requests()
    assert got[("unknown", "404", "NR")] == 1
    assert got[("empty.default.svc.cluster.local", "503", "UH")] == 1
    assert got[("dead.default.svc.cluster.local", "503", "UF")] == 1
    lines = [json.loads(line) for line in proxy.log_lines()]
    assert [(x["response_code"], x["response_flags"]) for x in lines] == [(404, "NR"), (503, "UH"),
                                                                          (503, "UF")]
    assert lines[2]["upstream_transport_failure_reason"] == "connection_refused"


def test_outlier_ejection_then_return(backends: Backends, proxies: Proxies) -> None:
    healthy = [True]
    flaky = Backend(lambda _c, _s: reply(200 if healthy[0] else 500, b"flaky"), name=b"flaky")
    steady = Backend(name=b"steady")
    backends += [flaky, steady]
    od = {"consecutive_5xx_errors": 3, "consecutive_gateway_errors": 0, "interval_ms": 100,
          "base_ejection_time_ms": 400, "max_ejection_percent": 100, "min_health_percent": 0}
    cfg = make_config([route(retries={"attempts": 0})],
                      clusters={CLUSTER: cluster_spec(lb={"simple": "ROUND_ROBIN"}, outlier_detection=od)},
                      endpoints={CLUSTER: [flaky.address, steady.address]})
    proxy = Proxy(cfg)
    proxies.append(proxy)
    c = Client(proxy.port)
    healthy[0] = False
    bodies = [c.request().body for _ in range(10)]
    assert bodies.count(b"flaky") == 3  # three 500s in a row, then ejected: the rest go to steady
    assert all(b == b"steady" for b in bodies[6:])
    healthy[0] = True
    time.sleep(0.5)
    bodies = [c.request().body for _ in range(10)]
    assert bodies.count(b"flaky") >= 4  # back in rotation after the ejection time


def test_circuit_breakers_overflow_with_503_uo(backends: Backends, proxies: Proxies) -> None:
    release = threading.Event()

    def slow(_c: socket.socket, _s: Seen) -> bytes:
        release.wait(5)
        return reply(200, b"slow")

    pool = {"tcp": {"connect_timeout_ms": 1000, "max_connections": 1},
            "http": {"http1_max_pending_requests": 1}}
    proxy, [b] = start(backends, proxies, slow, cluster={"connection_pool": pool})
    clients = [Client(proxy.port) for _ in range(3)]
    for c in clients[:2]:
        c.send(request_bytes())
    assert wait_for(lambda: len(b.seen) == 1)
    assert wait_for(lambda: proxy.pools()[0]["pending"] == 1)
    r = clients[2].request()
    assert r.status == 503 and b"overflow" in r.body
    release.set()
    assert [c.response().status for c in clients[:2]] == [200, 200]
    assert b.accepted == 1
    assert proxy.requests()[(SERVICE, "503", "UO")] == 1


def test_reused_connection_closed_by_the_server_is_retried_transparently(
        backends: Backends, proxies: Proxies) -> None:
    def once(conn: socket.socket, seen: Seen) -> bytes | None:
        conn.sendall(reply(200, seen.target))
        return None  # close after each response, without saying so

    proxy, [b] = start(backends, proxies, once, routes=[route(retries={"attempts": 0})])
    c = Client(proxy.port)
    for i in range(20):
        assert c.request("GET", f"/{i}").body == f"/{i}".encode()
    assert b.accepted == 20 and proxy.requests() == {(SERVICE, "200", "-"): 20}


# --- routing features ------------------------------------------------------------------------------


def test_bookinfo_reviews_80_20_weights_over_10000_requests(
        backends: Backends, proxies: Proxies, istio_testdata: Path) -> None:
    b = istio_testdata / "bookinfo"
    cfg = pilot_config(files(b / "virtual-service-reviews-80-20.yaml", b / "destination-rule-all.yaml"))
    v1 = Backend(name=b"v1")
    v2 = Backend(name=b"v2")
    backends += [v1, v2]
    for version, backend in (("v1", v1), ("v2", v2)):
        cfg["endpoints"][f"outbound|9080|{version}|{host('reviews')}"] = [backend.address]
    cfg["routes"]["80"] = cfg["routes"]["9080"]
    proxy = Proxy(cfg)
    proxies.append(proxy)
    counts: Counter[bytes] = Counter()
    n, conns = 10_000, 8
    payload = request_bytes("GET", "/reviews/0", host="reviews:9080") * 50

    def run() -> None:
        c = Client(proxy.port)
        for _ in range(n // conns // 50):
            c.send(payload)  # pipelined in batches of 50
            for _ in range(50):
                counts[c.response().body] += 1
        c.close()

    threads = [threading.Thread(target=run) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(counts.values()) == n
    # binomial(10000, 0.8): sd 40, so 4 sigma is 160
    assert abs(counts[b"v1"] - 8000) <= 160, counts
    assert v1.accepted <= conns and v2.accepted <= conns


def test_route_timeout_gives_504(backends: Backends, proxies: Proxies) -> None:
    def slow(_c: socket.socket, seen: Seen) -> bytes:
        time.sleep(0.6 if seen.target == b"/slow" else 0)
        return reply(200, b"late")

    proxy, _ = start(backends, proxies, slow, routes=[route(timeout_ms=200)])
    c = Client(proxy.port)
    started = time.monotonic()
    r = c.request("GET", "/slow")
    assert (r.status, r.body) == (504, b"upstream request timeout")
    assert 0.15 < time.monotonic() - started < 0.55
    assert c.request("GET", "/fast").status == 200  # same client connection, kept alive
    assert (SERVICE, "504", "UT") in proxy.requests()


def test_fault_abort_and_delay(backends: Backends, proxies: Proxies) -> None:
    vhosts = [{"name": "a", "domains": ["abort"], "routes": [
                  route(fault={"abort": {"http_status": 555, "percentage": 100.0}})]},
              {"name": "d", "domains": ["delay"], "routes": [
                  route(fault={"delay": {"fixed_delay_ms": 300, "percentage": 100.0}})]},
              {"name": "b", "domains": ["both"], "routes": [
                  route(fault={"delay": {"fixed_delay_ms": 200, "percentage": 100.0},
                               "abort": {"http_status": 556, "percentage": 100.0}})]}]
    backend = Backend()
    backends.append(backend)
    proxy = Proxy(make_config(vhosts=vhosts, endpoints={CLUSTER: [backend.address]}))
    proxies.append(proxy)
    c = Client(proxy.port)
    r = c.request(host="abort")
    assert (r.status, r.body) == (555, b"fault filter abort")
    started = time.monotonic()
    assert c.request(host="delay").status == 200
    assert time.monotonic() - started >= 0.29
    started = time.monotonic()
    r = c.request(host="both")  # Envoy delays, then aborts
    assert (r.status, r.body) == (556, b"fault filter abort")
    assert time.monotonic() - started >= 0.19
    got = proxy.requests()
    assert got[(SERVICE, "555", "FI")] == 1 and got[(SERVICE, "200", "DI")] == 1
    assert got[(SERVICE, "556", "DI,FI")] == 1
    assert len(backend.seen) == 1


def test_header_operations_and_rewrites(backends: Backends, proxies: Proxies) -> None:
    headers = {"request": {"set": {"x-set": "route"}, "add": {"x-add": "1"}, "remove": ["x-secret"]},
               "response": {"set": {"x-resp": "yes"}, "remove": ["server"]}}
    spec = route(headers=headers, rewrite={"uri": "/new", "authority": "internal.svc"},
                 match={"uri": {"prefix": "/old"}})
    spec["clusters"][0]["headers"] = {"request": {"set": {"x-subset": "v1"}}}
    proxy, [b] = start(backends, proxies, lambda _c, _s: reply(200, b"ok", [(b"server", b"app")]),
                       routes=[spec])
    c = Client(proxy.port)
    r = c.request("GET", "/old/path?q=1", headers=[("X-Secret", "s"), ("X-Set", "client"), ("X-Keep", "k")])
    assert r.status == 200 and r.headers[b"x-resp"] == b"yes" and b"server" not in r.headers
    seen = b.seen[-1]
    assert seen.target == b"/new/path?q=1" and seen.headers[b"host"] == b"internal.svc"
    assert seen.headers[b"x-set"] == b"route" and seen.headers[b"x-add"] == b"1"
    assert seen.headers[b"x-subset"] == b"v1" and seen.headers[b"x-keep"] == b"k"
    assert b"x-secret" not in seen.headers
    assert c.request("GET", "/other").status == 404  # the only route wants /old


def test_direct_response_and_redirect(backends: Backends, proxies: Proxies) -> None:
    routes = [{"name": "gone", "match": {"uri": {"exact": "/gone"}},
               "direct_response": {"status": 410, "body": "gone"}},
              {"name": "old", "match": {"uri": {"exact": "/old"}},
               "redirect": {"uri": "/new", "authority": "example.com", "redirect_code": 301}}]
    proxy, [b] = start(backends, proxies, routes=routes)
    c = Client(proxy.port)
    r = c.request("GET", "/gone")
    assert (r.status, r.body) == (410, b"gone")
    r = c.request("GET", "/old?x=1")
    assert r.status == 301 and r.headers[b"location"] == b"http://example.com/new?x=1"
    assert b.seen == []


def test_mirroring_reaches_the_mirror_with_shadow_host(backends: Backends, proxies: Proxies) -> None:
    mirror_name = "outbound|80||mirror.default.svc.cluster.local"
    main = Backend(name=b"main")
    mirror = Backend(lambda _c, _s: reply(500, b"ignored"), name=b"mirror")
    backends += [main, mirror]
    cfg = make_config([route(mirrors=[{"cluster": mirror_name, "percentage": 100.0}])],
                      clusters={CLUSTER: cluster_spec(), mirror_name: cluster_spec(mirror_name)},
                      endpoints={CLUSTER: [main.address], mirror_name: [mirror.address]})
    proxy = Proxy(cfg)
    proxies.append(proxy)
    c = Client(proxy.port)
    for i in range(5):
        r = c.request("POST", f"/m{i}", host="svc:80", body=b"payload")
        assert (r.status, r.body) == (200, b"main")
    assert wait_for(lambda: len(mirror.seen) == 5)
    assert {s.headers[b"host"] for s in mirror.seen} == {b"svc-shadow:80"}
    assert {s.body for s in mirror.seen} == {b"payload"}
    # responses are dropped and the connections kept: a later mirror reuses one
    assert wait_for(lambda: any(p["idle"] for p in proxy.pools() if "mirror" in p["cluster"]))
    accepted = mirror.accepted
    c.request("GET", "/again", host="svc:80")
    assert wait_for(lambda: len(mirror.seen) == 6) and mirror.accepted == accepted


def test_config_swap_under_load_loses_nothing(backends: Backends, proxies: Proxies) -> None:
    old = Backend(name=b"old")
    new = Backend(name=b"new")
    backends += [old, new]
    other = "outbound|80||new.default.svc.cluster.local"
    clusters = {CLUSTER: cluster_spec(), other: cluster_spec(other)}
    endpoints = {CLUSTER: [old.address], other: [new.address]}
    proxy = Proxy(make_config(clusters=clusters, endpoints=endpoints))
    proxies.append(proxy)
    stop = threading.Event()
    results: list[tuple[int, bytes]] = []

    def hammer() -> None:
        c = Client(proxy.port)
        while not stop.is_set():
            r = c.request()
            results.append((r.status, r.body))
        c.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(results) > 200)
    for version in range(5):  # swap back and forth under load, the last one to "new"
        target = other if version % 2 == 0 else CLUSTER
        proxy.apply(make_config([route(target)], clusters=clusters, endpoints=endpoints,
                                version=f"v{version + 2}"))
        mark = len(results)
        assert wait_for(lambda m=mark: len(results) > m + 50)
    stop.set()
    for t in threads:
        t.join(10)
    assert all(status == 200 for status, _ in results), Counter(results)
    assert results[-1][1] == b"new" and len(results) > 450
    assert old.accepted <= 4 and new.accepted <= 4  # pools survived the swaps


def test_stats_labels_and_access_log(backends: Backends, proxies: Proxies) -> None:
    proxy, _ = start(backends, proxies)
    c = Client(proxy.port)
    c.request("POST", "/stats", body=b"12345", headers=[("User-Agent", "ua/1"), ("X-Request-Id", "rid-1")])
    snap = proxy.on_loop(proxy.runtime.stats.snapshot)
    [(labels, values)] = snap["requests"]
    named = dict(zip(LABELS, labels, strict=True))
    assert named["reporter"] == "source" and named["source_workload"] == "client"
    assert named["destination_service"] == SERVICE and named["destination_service_name"] == "svc"
    assert named["response_code"] == "200" and named["request_protocol"] == "http"
    assert values[0] == 1 and values[2] > 5  # request bytes count the head too
    [line] = [json.loads(x) for x in proxy.log_lines()]
    assert line["method"] == "POST" and line["path"] == "/stats" and line["response_code"] == 200
    assert line["bytes_received"] == 5 and line["bytes_sent"] == 2 and line["user_agent"] == "ua/1"
    assert line["request_id"] == "rid-1" and line["upstream_cluster"] == CLUSTER
    assert line["upstream_host"].startswith("127.0.0.1:") and line["route_name"] == "default"
    assert line["authority"] == "svc" and line["protocol"] == "HTTP/1.1"


def test_inbound_goes_to_the_local_app_and_reports_as_destination(
        backends: Backends, proxies: Proxies) -> None:
    app = Backend(name=b"app")
    backends.append(app)
    inbound = f"inbound|{app.port}||"
    cfg = make_config(clusters={inbound: {"name": inbound, "direction": "inbound", "port": app.port,
                                          "type": "STATIC"}},
                      endpoints={inbound: [app.address]},
                      inbound=[{"name": f"inbound_{app.port}", "port": app.port, "protocol": "HTTP",
                                "mtls_mode": "PERMISSIVE", "cluster": inbound,
                                "services": [{"service": SERVICE, "port": 80}]}])
    cfg["routes"] = {}
    proxy = Proxy(cfg, inbound_cluster=inbound)
    proxies.append(proxy)
    c = Client(proxy.port)
    assert c.request(host="anything").body == b"app"
    snap = proxy.on_loop(proxy.runtime.stats.snapshot)
    named = dict(zip(LABELS, snap["requests"][0][0], strict=True))
    assert named["reporter"] == "destination" and named["destination_service"] == SERVICE


def test_http10_client_and_close_delimited_responses(backends: Backends, proxies: Proxies) -> None:
    def until_close(conn: socket.socket, _s: Seen) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        conn.close()

    proxy, _ = start(backends, proxies, until_close)
    c = Client(proxy.port)
    r = c.request()  # an HTTP/1.1 client gets it chunked, and keeps its connection
    assert (r.status, r.body) == (200, b"all of it") and r.headers[b"transfer-encoding"] == b"chunked"
    c.send(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
    c.sock.settimeout(3)
    got = b""
    while data := c.sock.recv(65536):
        got += data
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nall of it")
    assert b"transfer-encoding" not in got and b"connection: close" in got


def test_back_pressure_bounds_what_the_proxy_holds(backends: Backends, proxies: Proxies) -> None:
    size = 32 << 20
    blob = bytes(range(256)) * (size // 256)

    def big(conn: socket.socket, _s: Seen) -> bytes:
        return reply(200, blob)

    proxy, _ = start(backends, proxies, big)
    c = Client(proxy.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    c.send(request_bytes())
    time.sleep(0.5)  # the client reads nothing meanwhile

    def held() -> int:
        return sum(len(x.d_pending) + x.parser.buffered + sum(map(len, x.up_pending))
                   for x in http_state(proxy.runtime).connections)

    assert proxy.on_loop(held) <= 4 * 65536  # per side: MAX_BUFFER plus one read
    got = bytearray()
    c.sock.settimeout(5)
    while len(got) < size + 100:
        data = c.sock.recv(1 << 20)
        if not data:
            break
        got += data
        if got.endswith(blob[-64:]) and len(got) >= size:
            break
    assert bytes(got[-size:]) == blob


def test_idle_keep_alive_connections_close_and_draining(backends: Backends, proxies: Proxies) -> None:
    proxy, _ = start(backends, proxies, options=HttpOptions(idle_timeout=0.3))
    idle = Client(proxy.port)
    assert idle.request().status == 200
    assert idle.closed(timeout=3)
    busy = Client(proxy.port)
    assert busy.request().status == 200
    proxy.runtime.draining = True
    r = busy.request()
    assert r.status == 200 and r.headers[b"connection"] == b"close"
    assert busy.closed()


def test_two_sidecars_client_outbound_to_server_inbound(backends: Backends, proxies: Proxies) -> None:
    app = Backend(lambda _c, s: reply(200, b"app saw " + s.headers[b"x-request-id"]), name=b"app")
    backends.append(app)
    inbound = f"inbound|{app.port}||"
    server_cfg = make_config(clusters={inbound: {"name": inbound, "direction": "inbound", "port": app.port,
                                                 "type": "STATIC"}},
                             endpoints={inbound: [app.address]},
                             inbound=[{"name": "inbound", "port": app.port, "protocol": "HTTP",
                                       "mtls_mode": "PERMISSIVE", "cluster": inbound,
                                       "services": [{"service": SERVICE, "port": 80}]}])
    server_cfg["routes"] = {}
    server = Proxy(server_cfg, inbound_cluster=inbound)
    client = Proxy(make_config(endpoints={CLUSTER: [endpoint(server.port)]}))
    proxies += [server, client]
    c = Client(client.port)
    r = c.request("POST", "/hop", body=b"x" * 100_000)
    assert r.status == 200 and r.body.startswith(b"app saw ")
    [seen] = app.seen
    assert len(seen.body) == 100_000 and seen.headers[b"x-forwarded-proto"] == b"http"
    assert r.body == b"app saw " + seen.headers[b"x-request-id"]  # the client sidecar's id went through
    assert (SERVICE, "200", "-") in client.requests() and (SERVICE, "200", "-") in server.requests()


def test_upstream_pool_limits_requests_per_connection_and_idle_time(backends: Backends,
                                                                    proxies: Proxies) -> None:
    pool = {"tcp": {"connect_timeout_ms": 1000},
            "http": {"max_requests_per_connection": 2, "idle_timeout_ms": 200}}
    proxy, [b] = start(backends, proxies, cluster={"connection_pool": pool})
    c = Client(proxy.port)
    for _ in range(3):
        assert c.request().status == 200
    assert b.accepted == 2  # the first connection retired after its second request
    assert proxy.pools()[0]["idle"] == 1
    assert wait_for(lambda: proxy.pools()[0]["open"] == 0, timeout=3)  # idle past 200 ms: closed
    assert c.request().status == 200 and b.accepted == 3


def test_per_try_timeout_retries_on_another_endpoint(backends: Backends, proxies: Proxies) -> None:
    def stuck(_c: socket.socket, _s: Seen) -> bytes:
        time.sleep(1.0)
        return reply(200, b"stuck")

    retries = {"attempts": 2, "per_try_timeout_ms": 150, "retry_on": ["gateway-error"], "backoff_ms": 1}
    proxy, [slow, fast] = start(backends, proxies, stuck, None, routes=[route(retries=retries)],
                                cluster={"lb": {"simple": "ROUND_ROBIN"}})
    c = Client(proxy.port)
    for _ in range(4):
        started = time.monotonic()
        r = c.request()
        assert (r.status, r.body) == (200, b"b1") and time.monotonic() - started < 0.9
    assert len(slow.seen) >= 1 and len(fast.seen) == 4


def test_consistent_hash_on_a_header_sticks(backends: Backends, proxies: Proxies) -> None:
    lb = {"consistent_hash": {"http_header_name": "x-user", "minimum_ring_size": 1024}}
    proxy, _ = start(backends, proxies, None, None, None, cluster={"lb": lb})
    c = Client(proxy.port)
    chosen = {user: {c.request(headers=[("X-User", user)]).body for _ in range(10)} for user in "abcdefgh"}
    assert all(len(bodies) == 1 for bodies in chosen.values())  # each user always lands on one
    assert len({b for bodies in chosen.values() for b in bodies}) > 1  # and users spread


def test_upload_back_pressure_bounds_what_the_proxy_holds(backends: Backends, proxies: Proxies) -> None:
    size = 16 << 20
    go = threading.Event()
    proxy, [b] = start(backends, proxies, lambda _c, seen: reply(200, b"%d" % len(seen.body)))
    serve = b._serve

    def gated(conn: socket.socket) -> None:  # the backend reads nothing for a while
        go.wait(5)
        serve(conn)

    b._serve = gated  # type: ignore[method-assign]
    c = Client(proxy.port, timeout=10)
    sender = threading.Thread(target=c.send, args=(request_bytes("POST", "/up", body=b"u" * size),),
                              daemon=True)
    sender.start()
    time.sleep(0.5)

    def held() -> int:
        return sum(x.parser.buffered + x.up_queued for x in http_state(proxy.runtime).connections)

    assert proxy.on_loop(held) <= 4 * 65536  # per side: MAX_BUFFER plus one read
    go.set()
    sender.join(10)
    assert c.response("POST").body == b"%d" % size
