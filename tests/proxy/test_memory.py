"""What the proxy holds in memory (dataplane/proxy/memory.py, admin /memory), and that a new upstream
mTLS connection leaves nothing behind once closed: real `meshctl proxy --certs` sidecars on loopback
(tests/identity/sidecars.py), real certificates, malloc's own count of the bytes in use.

The leak this guards against: confirming an upstream handshake by reading `SSLSocket.session`, which
on CPython before 3.12.7 leaks a copy of the OpenSSL session per access (~11 KiB per connection)."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.proxy import memory
from tests.conftest import free_port
from tests.identity.sidecars import Sidecar, client_config, server_config
from tests.proxy.l7helpers import Backend, reply
from tests.proxy.test_mtls import CLIENT_ID, Ca

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"  # the identity sidecars.py's configs use
WARM, CONNECTIONS = 200, 1500
LEAK_BOUND = 2 * 1024 * CONNECTIONS  # 2 KiB a connection; the session leak was ~11 KiB


def _get(port: int, path: str) -> bytes:
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as c:
        c.request("GET", path)
        resp = c.getresponse()
        body = resp.read()
        assert resp.status == 200, (path, resp.status, body[:200])
        return body


def _memory(side: Sidecar) -> dict[str, Any]:
    return json.loads(_get(side.admin_port, "/memory"))


def _worker_allocated(side: Sidecar) -> int:
    (worker,) = [p for p in _memory(side)["processes"] if p["worker"] == 0]
    return worker["allocated"]


def _upstream_connections(side: Sidecar) -> int:
    lines = _get(side.admin_port, "/stats").decode().splitlines()
    return sum(int(line.rsplit(":", 1)[1]) for line in lines
               if line.split(":")[0].endswith(".upstream_cx_total"))


def _fresh_requests(port: int, n: int) -> list[str]:
    """`n` requests, a new connection each (the port allows one request per upstream connection, so
    each is a new mTLS handshake); what went wrong, if anything."""
    wrong = []
    for i in range(n):
        try:
            body = _get(port, f"/fresh/{i}")
        except (OSError, http.client.HTTPException, AssertionError) as exc:
            wrong.append(repr(exc))
            continue
        if body != b"hello":
            wrong.append(repr(body[:100]))
    return wrong


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[tuple[Sidecar, int]]:
    """A client sidecar (and the port that opens an upstream mTLS connection per request) in front of a
    server sidecar in front of an app."""
    ca = Ca()
    ca.issue(tmp_path / "server-certs", SERVER_ID)
    ca.issue(tmp_path / "client-certs", CLIENT_ID)
    app = Backend(lambda _c, _seen: reply(200, b"hello"))
    made: list[Sidecar] = []
    try:
        server = Sidecar(tmp_path, "server-1", server_config(app.port), tmp_path / "server-certs")
        made.append(server)
        server.wait_listening(server.inbound_port)
        pooled, fresh = free_port(), free_port()
        client = Sidecar(tmp_path, "client-1", client_config(server.inbound_port, pooled, fresh, SERVER_ID),
                         tmp_path / "client-certs")
        made.append(client)
        client.wait_listening(fresh)
        yield client, fresh
    finally:
        for side in made:
            side.close()
        app.close()


def test_usage_counts_what_malloc_hands_out() -> None:
    before = memory.usage()
    block = bytearray(32 << 20)  # past malloc's mmap threshold: its own mapping, counted at once
    during = memory.usage()
    del block
    after = memory.usage()
    assert during["allocated"] - before["allocated"] >= 32 << 20
    assert during["heap_size"] >= during["allocated"]
    assert during["allocated"] - after["allocated"] >= 32 << 20
    assert during["total_physical_bytes"] > 0


def test_release_hands_free_heap_holes_back_once() -> None:
    memory.release()  # from a trimmed heap
    big = [bytearray(100_000) for _ in range(300)]  # 30 MB of heap blocks (below the mmap threshold)
    pins = [bytearray(50_000) for _ in range(300)]  # above them: freeing `big` leaves holes, not a top
    del big
    rss = memory.rss_bytes()
    assert memory.release()
    assert memory.rss_bytes() < rss - (20 << 20)
    assert not memory.release()  # nothing freed since: no second trim
    assert len(pins) == 300


def test_merge_sums_each_field_as_envoy_strings() -> None:
    merged = memory.merge([{"worker": 0, "allocated": 5, "heap_size": 8, "pageheap_free": 1,
                            "total_physical_bytes": 20},
                           {"worker": 1, "allocated": 7, "heap_size": 9, "pageheap_free": 2,
                            "total_physical_bytes": 30}])
    assert (merged["allocated"], merged["heap_size"], merged["total_physical_bytes"]) == ("12", "17", "50")
    no_malloc = memory.merge([{"worker": 0, "total_physical_bytes": 20, "malloc": "unavailable"}])
    assert "allocated" not in no_malloc and no_malloc["total_physical_bytes"] == "20"


def test_upstream_mtls_connections_leave_no_memory_behind(sidecars: tuple[Sidecar, int]) -> None:
    client, fresh = sidecars
    assert _fresh_requests(fresh, WARM) == []  # pools, caches and the allocator's arenas settle
    page = _memory(client)
    assert {p["worker"] for p in page["processes"]} == {"supervisor", 0}
    assert int(page["allocated"]) >= sum(p["allocated"] for p in page["processes"] if p["worker"] == 0)
    allocated, opened = _worker_allocated(client), _upstream_connections(client)
    assert _fresh_requests(fresh, CONNECTIONS) == []
    assert _upstream_connections(client) - opened >= CONNECTIONS  # each request was a new handshake
    grown = _worker_allocated(client) - allocated
    assert grown < LEAK_BOUND, f"the worker kept {grown / CONNECTIONS:.0f} bytes per closed mTLS connection"
