"""A control plane (galley publisher, pilot, citadel) and node agents in-process on real sockets, for the
node agent's tests and the identity end-to-end tests: the pieces they share, in one place."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509

from bus.keys import Keyring
from bus.loop import Loop
from bus.rpc import Request, RpcClient, RpcServer
from bus.signing import Verifier
from controlplane.citadel.authz import RegistrationsAuthorizer
from controlplane.citadel.ca import CertificateAuthority
from controlplane.citadel.pki import SigningCa, new_root
from controlplane.citadel.service import Citadel
from controlplane.debounce import Debouncer
from controlplane.pilot.xds.server import Pilot, subscribe_galley
from nodeagent.agent import NodeAgent, Upstream
from nodeagent.certs import split_pem
from tests.bus.helpers import FAST_SUB, publisher
from tests.conftest import free_port, wait_released

TTL = 4


def workload_yaml(wid: str, sa: str = "reviews", ip: str = "10.0.0.1", namespace: str = "default") -> str:
    return (f"id: {wid}\nnamespace: {namespace}\nservice_account: {sa}\nip: {ip}\n"
            f"labels: {{app: {sa}}}\nports: {{http: 9080}}\n")


class Records(logging.Handler):
    """The node agent's log lines, with their key=value fields."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    def matching(self, msg: str) -> list[dict[str, Any]]:
        return [fields for m, fields in list(self.lines) if m == msg]


@contextlib.contextmanager
def node_agent_logs() -> Iterator[Records]:
    """Records of every line the node agents in this process log, while the block runs."""
    handler = Records()
    logger = logging.getLogger("zmesh.nodeagent")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def recording(handlers: dict[str, Any], seen: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """Wrap RPC handlers so every request body that reaches the server is kept."""
    def wrap(method: str, handler: Any) -> Any:
        def run(req: Request) -> Any:
            seen.append((method, req.peer, req.body))
            return handler(req)
        return run
    return {m: wrap(m, h) for m, h in handlers.items()}


class ControlPlane:
    """A galley publisher, pilot and citadel, each on its own loop; citadel can stop and come back
    on the same ports with the same CA. Every RPC request pilot and citadel receive is recorded."""

    def __init__(self, keydir: Path, loops: Any, lease: float = 15.0, retire_grace_s: float = 0.0) -> None:
        self.keydir = keydir
        self.requests: list[tuple[str, str, Any]] = []
        self.galley = publisher(loops("galley"), keydir, name="galley")
        self.pilot_loop: Loop = loops("pilot")
        ring = Keyring(keydir, "pilot")
        self.pilot_pub = publisher(self.pilot_loop, keydir, name="pilot")
        self.pilot: Pilot = self.pilot_loop.call_sync(
            lambda: Pilot(self.pilot_loop, self.pilot_pub, Debouncer(0.02, 1.0), lease=lease))
        self.pilot_loop.call_sync(lambda: subscribe_galley(
            self.pilot_loop, self.pilot, pub_endpoint=self.galley.pub_endpoint,
            snapshot_endpoint=self.galley.snapshot_endpoint, keyring=ring, server="galley",
            verifier=Verifier(ring.trusted_signers),
            **FAST_SUB))
        handlers = self.pilot.rpc_handlers()
        handlers.setdefault("workloads", self._workloads)  # citadel's node authorization asks pilot
        self.pilot_rpc = self.pilot_loop.call_sync(lambda: RpcServer(
            self.pilot_loop, "tcp://127.0.0.1:*", ring, recording(handlers, self.requests), name="pilot"))
        self._authz_client = RpcClient(self.pilot_rpc.endpoint, Keyring(keydir, "citadel"), "pilot",
                                       origin="citadel", timeout=0.5, retries=1)
        root, root_key = new_root("cluster.local", time.time())
        self.ca = CertificateAuthority(SigningCa(root, root_key),
                                       RegistrationsAuthorizer(self._authz_client.call),
                                       retire_grace_s=retire_grace_s)
        self.citadel_ports = {"rpc": free_port(), "pub": free_port(), "snapshot": free_port()}
        self.citadel_loop: Loop | None = None
        self.start_citadel()

    def _workloads(self, req: Request) -> list[dict[str, str]]:
        node = str((req.body or {}).get("node", ""))
        return [{"namespace": w.namespace, "service_account": w.service_account}
                for w in self.pilot.registry.registrations.workloads() if w.node == node]

    def endpoint(self, socket: str) -> str:
        return f"tcp://127.0.0.1:{self.citadel_ports[socket]}"

    def start_citadel(self) -> None:
        loop = self.citadel_loop = Loop("citadel").start()
        ring = Keyring(self.keydir, "citadel")
        pub = publisher(loop, self.keydir, name="citadel", pub_endpoint=self.endpoint("pub"),
                        snapshot_endpoint=self.endpoint("snapshot"))
        citadel = loop.call_sync(lambda: Citadel(loop, self.ca, pub))
        loop.call_sync(lambda: RpcServer(loop, self.endpoint("rpc"), ring,
                                         recording(citadel.rpc_handlers(), self.requests), name="citadel"))

    def stop_citadel(self) -> None:
        assert self.citadel_loop is not None
        self.citadel_loop.stop()
        self.citadel_loop = None
        wait_released(*self.citadel_ports.values())  # start_citadel binds them again

    @property
    def pilot_upstream(self) -> Upstream:
        return Upstream("pilot", self.pilot_rpc.endpoint, self.pilot_pub.pub_endpoint,
                        self.pilot_pub.snapshot_endpoint)

    @property
    def citadel_upstream(self) -> Upstream:
        return Upstream("citadel", self.endpoint("rpc"), self.endpoint("pub"), self.endpoint("snapshot"))

    def registered(self) -> dict[str, str]:
        """Workload id -> node, as pilot holds them."""
        return self.pilot_loop.call_sync(
            lambda: {w.name: w.node for w in self.pilot.registry.registrations.workloads()})

    def close(self) -> None:
        if self.citadel_loop is not None:
            self.citadel_loop.stop()
        self._authz_client.close()


class Node:
    """A node agent on its own loop, with a short run dir (unix socket paths are limited to 107 bytes)."""

    def __init__(self, cp: ControlPlane, loops: Any, name: str = "nodeagent", **kw: Any) -> None:
        self.run = Path(tempfile.mkdtemp(prefix="na-", dir="/tmp"))
        self.workloads = self.run / "workloads"
        self.workloads.mkdir()
        self.loop: Loop = loops(name)
        opts = {"cert_ttl": TTL, "poll_interval": 0.1, "backoff": (0.3, 1.0), "rpc_timeout": 0.5, **kw}
        self.agent: NodeAgent = self.loop.call_sync(lambda: NodeAgent(
            self.loop, Keyring(cp.keydir, name), run_dir=self.run, workloads_dir=self.workloads,
            pilot=cp.pilot_upstream, citadel=cp.citadel_upstream, **opts))

    def add(self, wid: str, **kw: Any) -> None:
        tmp = self.workloads / f".{wid}.tmp"
        tmp.write_text(workload_yaml(wid, **kw))
        tmp.rename(self.workloads / f"{wid}.yaml")

    def certs(self, wid: str) -> Path:
        return self.run / "certs" / wid

    def version(self, wid: str) -> str:
        """The version in force ("" before the first set and after removal). A missing `version` in
        an existing directory means a set is being written: wait for it (bounded)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                return (self.certs(wid) / "version").read_text().strip()
            except FileNotFoundError:
                if not self.certs(wid).is_dir() or time.monotonic() > deadline:
                    return ""
            time.sleep(0.005)

    def leaf(self, wid: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(split_pem((self.certs(wid) / "cert-chain.pem").read_text())[0]
                                              .encode())

    def close(self) -> None:
        self.loop.stop()  # first: a renewal landing after the rmtree would make the run dir again
        shutil.rmtree(self.run, ignore_errors=True)
