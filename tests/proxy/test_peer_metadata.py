"""Istio's HTTP metadata exchange (dataplane/proxy/peer_metadata.py): the sans-IO encoding, decoding
and cache, and two real sidecars over mutual TLS (test_mtls's in-process sides, real certificates,
loopback sockets) reporting each other's workload in their metrics."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dataplane.proxy import peer_metadata
from dataplane.proxy.peer_metadata import HEADER, HEADER_ID, PeerCache, decode, encode, header_lines
from dataplane.proxy.stats import DESTINATION, LABELS, SOURCE, Stats, Workload
from tests.conftest import free_port, wait_for
from tests.proxy.l7helpers import Backend, Client, Seen, reply
from tests.proxy.test_mtls import (
    CLIENT_ID,
    MUTUAL,
    SERVER_ID,
    Ca,
    Side,
    client_config,
    server_config,
)

CLIENT = Workload(name="client", namespace="default", app="client", version="v1",
                  canonical_service="client-svc", canonical_revision="v1", cluster="c1")
SERVER = Workload(name="server", namespace="prod", app="server", version="v2", canonical_service="server",
                  canonical_revision="v2", cluster="c1")


def _b64(meta: object) -> bytes:
    return base64.b64encode(json.dumps(meta).encode())


# --- sans-IO ----------------------------------------------------------------------------------
def test_round_trip_keeps_what_stats_need() -> None:
    value = encode(CLIENT, "client-7d9f.default")
    meta = json.loads(base64.b64decode(value))
    assert meta == {"NAME": "client-7d9f.default", "NAMESPACE": "default", "WORKLOAD_NAME": "client",
                    "CLUSTER_ID": "c1", "LABELS": {"app": "client", "version": "v1",
                                                   "service.istio.io/canonical-name": "client-svc",
                                                   "service.istio.io/canonical-revision": "v1"}}
    assert b" " not in base64.b64decode(value)  # compact JSON
    assert decode(value) == CLIENT
    lines = header_lines(CLIENT, "client-7d9f.default")
    assert lines == (b"x-envoy-peer-metadata-id: client-7d9f.default\r\n"
                     b"x-envoy-peer-metadata: " + value + b"\r\n")


def test_istio_label_fallbacks_and_unknowns() -> None:
    assert decode(_b64({"WORKLOAD_NAME": "w", "LABELS": {"app": "a", "version": "v3"}})) == Workload(
        name="w", app="a", version="v3", canonical_service="a", canonical_revision="v3")
    assert decode(_b64({"WORKLOAD_NAME": "w", "LABELS": {"app.kubernetes.io/name": "k",
                                                         "app.kubernetes.io/version": "9"}})) == Workload(
        name="w", canonical_service="k", canonical_revision="9")
    assert decode(_b64({})) == Workload()
    # what a Workload without labels sends (unknowns are left out) reads back the same
    assert decode(encode(Workload(name="x"), "x")) == Workload(name="x", canonical_service="x")


@pytest.mark.parametrize("value", [
    b"not base64!", b"YWJj=", base64.b64encode(b"\xff\xfe"), base64.b64encode(b"{nope"), _b64([1, 2]),
    _b64({"LABELS": ["app"]}), _b64({"WORKLOAD_NAME": 3}), _b64({"LABELS": {"app": {"x": 1}}}),
    _b64({"NAMESPACE": "x" * peer_metadata.MAX_VALUE}), b"",
])
def test_malformed_values_leave_the_peer_unknown(value: bytes) -> None:
    assert decode(value) is None
    cache = PeerCache()
    assert cache.get(value) is None
    assert cache.get(value) is None and list(cache.peers) == [value]  # remembered: costs a lookup


def test_cache_returns_the_same_peer_and_stays_bounded() -> None:
    cache = PeerCache(size=2)
    a, b, c = (encode(Workload(name=n), n) for n in "abc")
    peer = cache.get(a)
    assert peer is not None and peer.workload.name == "a" and cache.get(a) is peer
    cache.get(b)
    cache.get(c)
    assert list(cache.peers) == [b, c]
    with pytest.raises(ValueError, match="at least 1"):
        PeerCache(size=0)


def test_own_header_needs_a_printable_id() -> None:
    for bad in ("", "a\r\nx-evil: 1", "pod\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII"):
            header_lines(CLIENT, bad)


def test_peer_keys_fill_the_other_side_once() -> None:
    stats = Stats(SERVER)
    key = stats.request_key(DESTINATION, Workload(), service_host="server.prod.svc.cluster.local")
    peer = PeerCache().get(encode(CLIENT, "client"))
    assert peer is not None
    got = peer.key(stats, key)
    assert peer.key(stats, key) is got
    labels = dict(zip(LABELS, got.head, strict=False))
    assert (labels["source_workload"], labels["source_workload_namespace"], labels["source_app"],
            labels["source_version"], labels["source_canonical_service"], labels["source_canonical_revision"],
            labels["source_cluster"]) == ("client", "default", "client", "v1", "client-svc", "v1", "c1")
    assert labels["destination_workload"] == "server" and labels["source_principal"] == "unknown"
    src_stats = Stats(CLIENT)
    src = src_stats.with_peer(src_stats.request_key(SOURCE, Workload(), service_host="server.prod.svc"),
                              SERVER)
    labels = dict(zip(LABELS, src.head, strict=False))
    assert (labels["destination_workload"], labels["destination_workload_namespace"],
            labels["destination_app"], labels["destination_version"], labels["destination_service_namespace"],
            labels["source_workload"]) == ("server", "prod", "server", "v2", "prod", "client")
    assert src_stats.request_key(SOURCE, SERVER, service_host="server.prod.svc").head == src.head


# --- two sidecars -------------------------------------------------------------------------------
def _local(side: Side, workload: Workload) -> None:
    principal = side.runtime.stats.local.principal
    local = Workload(name=workload.name, namespace=workload.namespace, principal=principal, app=workload.app,
                     version=workload.version, canonical_service=workload.canonical_service,
                     canonical_revision=workload.canonical_revision, cluster=workload.cluster)
    side.on_loop(lambda: setattr(side.runtime.stats, "local", local))


def _forging_app(_conn: object, seen: Seen) -> bytes:
    """An app that echoes the metadata it saw and tries to pass metadata of its own upstream."""
    saw = b",".join(sorted(k for k in seen.headers if k.startswith(b"x-envoy-peer")))
    return reply(200, b"saw:" + saw, [(HEADER_ID, b"forged"), (HEADER, encode(Workload(name="forged"), "f"))])


def test_two_sidecars_report_each_others_workload(tmp_path: Path, sides: list[Side]) -> None:
    ca = Ca()
    ca.issue(tmp_path / "server", SERVER_ID)
    ca.issue(tmp_path / "client", CLIENT_ID)
    app = Backend(_forging_app)
    try:
        server = Side(server_config({app.port: "HTTP"}, "PERMISSIVE"), tmp_path / "server", name="server",
                      inbound=(app.port,))
        sides.append(server)
        http_port = free_port()
        client = Side(client_config({http_port: ("HTTP", server.port("inbound", app.port))}, MUTUAL),
                      tmp_path / "client", name="client", outbound=(http_port,))
        sides.append(client)
        _local(server, SERVER)
        _local(client, CLIENT)
        c = Client(client.port("outbound", http_port), timeout=10)
        evil = encode(Workload(name="evil"), "e").decode()
        forged = [(HEADER_ID.decode(), "evil"), (HEADER.decode(), evil)]
        for headers in ([], forged, []):  # what the client app sends is dropped, ours goes instead
            got = c.request(path="/x", headers=headers)
            assert got.status == 200 and got.body == b"saw:"  # the app never sees metadata
            assert not {HEADER, HEADER_ID} & set(got.headers)  # nor does the client app
        c.close()

        # a client outside the mesh (plain text, no metadata) gets no metadata back
        plain = Client(server.port("inbound", app.port), timeout=10)
        got = plain.request(path="/plain")
        assert got.body == b"saw:" and not {HEADER, HEADER_ID} & set(got.headers)
        # one that sends (bad) metadata gets ours, and stays unknown
        got = plain.request(path="/bad", headers=[(HEADER.decode(), "%%%"), (HEADER_ID.decode(), "x")])
        assert got.body == b"saw:" and decode(got.headers[HEADER]) == SERVER
        assert got.headers[HEADER_ID] == b"sidecar~server"
        plain.close()

        assert wait_for(lambda: sum(s["count"] for s in server.series()) == 5)
        dest = {(s["source_workload"], s["source_workload_namespace"], s["source_app"], s["source_version"],
                 s["source_canonical_service"], s["source_principal"], s["destination_workload"]): s["count"]
                for s in server.series() if s["count"]}
        assert dest == {("client", "default", "client", "v1", "client-svc", CLIENT_ID, "server"): 3,
                        ("unknown", "unknown", "unknown", "unknown", "unknown", "unknown", "server"): 2}
        src = {(s["destination_workload"], s["destination_workload_namespace"], s["destination_app"],
                s["destination_version"], s["destination_canonical_revision"], s["destination_principal"],
                s["source_workload"]): s["count"] for s in client.series() if s["count"]}
        assert src == {("server", "prod", "server", "v2", "v2", SERVER_ID, "client"): 3}
    finally:
        app.close()


def test_no_metadata_towards_upstreams_outside_the_mesh(sides: list[Side]) -> None:
    app = Backend(_forging_app)
    try:
        http_port = free_port()
        client = Side(client_config({http_port: ("HTTP", app.port)}, None), None, name="client",
                      outbound=(http_port,))
        sides.append(client)
        _local(client, CLIENT)
        c = Client(client.port("outbound", http_port), timeout=10)
        got = c.request(path="/out", headers=[(HEADER.decode(), encode(CLIENT, "c").decode())])
        assert got.body == b"saw:" and not {HEADER, HEADER_ID} & set(got.headers)
        c.close()
        assert wait_for(lambda: any(s["count"] for s in client.series()))
        assert [s["destination_workload"] for s in client.series() if s["count"]] == ["unknown"]
    finally:
        app.close()
