"""The node agent's shell: workloads in, registrations to pilot, CSRs to citadel, files out.

Everything runs on one Loop. The decisions live in sans-IO classes (`workloads.Inventory`
for what changed, `rotation.Rotation` for when to ask citadel); this module only wires
them to sockets and files:

- workloads from the workloads directory and the local RPC (`ipc://<run-dir>/agent.sock`:
  `add_workload`, `remove_workload`, `status`) are registered with pilot as this node's
  (node = our key name), and kept alive by one heartbeat per lease/3;
- each (namespace, service account) gets a key made here and a certificate from citadel,
  written to `<run-dir>/certs/<workload-id>/` for every workload running as it;
- citadel's trust bundle (`ca/bundle`) is followed: a new one rewrites root-cert.pem at
  once and re-issues every certificate, so workloads move to the new root;
- a certificate from a root this agent has known for less than `trust_settle_s` is held back
  until then: citadel signs with a new root at once, and a peer proxy that has not yet loaded
  the bundle with that root (proxies reload on a 1 s tick) would refuse it;
- pilot's `cfg/` keys are relayed to `ipc://<run-dir>/cfg.pub` / `cfg.snap`, so the
  node's proxies cost pilot one connection.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bus import endpoints
from bus.backoff import Backoff
from bus.keys import Keyring
from bus.logs import Log
from bus.loop import Loop
from bus.pubsub import Subscriber
from bus.relay import Relay
from bus.rpc import AsyncRpcClient, Request, RpcError, RpcServer
from bus.signing import Verifier
from meshapi.identity import CERTS_DIR, spiffe_id
from nodeagent import metrics as M
from nodeagent.certs import (
    CertDir,
    CertSet,
    chains_to,
    check_leaf,
    default_owner,
    new_key_and_csr,
    split_pem,
)
from nodeagent.rotation import RETRY_JITTER, Rotation
from nodeagent.watch import WorkloadDir
from nodeagent.workloads import Inventory, Workload, WorkloadError, parse_text, parse_workload

BUNDLE_KEY = "ca/bundle"
CONFIG_PREFIX = "cfg/"
DEFAULT_LEASE = 15.0  # pilot's; replaced by what its first `register` reply says
_TICK = 0.2
SIGN_BATCH = 64  # CSRs per sign_batch request (citadel takes up to 256)


@dataclass(frozen=True)
class Upstream:
    """A control-plane component: its key name and bus endpoints."""
    name: str
    rpc: str
    pub: str
    snapshot: str

    @classmethod
    def of(cls, component: str, host: str, port_base: int | None, name: str | None = None) -> Upstream:
        """Its endpoints from bus/endpoints.py."""
        return cls(name or component, *(endpoints.tcp(component, socket, host, port_base)
                                         for socket in ("rpc", "pub", "snapshot")))


@dataclass
class _Identity:
    key: tuple[str, str]  # (namespace, service account)
    spiffe: str
    rotation: Rotation
    workloads: set[str] = field(default_factory=set)
    certs: CertSet | None = None
    held: CertSet | None = None  # issued, waiting for its root to settle
    expired_logged: bool = False


class NodeAgent:
    """Build it in its loop's thread (or before the loop starts)."""

    def __init__(self, loop: Loop, keyring: Keyring, *, run_dir: str | os.PathLike, pilot: Upstream,
                 citadel: Upstream, workloads_dir: str | os.PathLike | None = None,
                 trust_domain: str = "cluster.local", cert_ttl: int | None = None,
                 owner: tuple[int, int] | None = None, poll_interval: float = 1.0,
                 backoff: tuple[float, float] = (1.0, 30.0), rpc_timeout: float = 2.0,
                 trust_settle_s: float = 2.0) -> None:
        self.loop = loop
        self.node = keyring.name
        self.trust_domain = trust_domain
        self.cert_ttl = cert_ttl
        self.owner = owner or default_owner()
        self.backoff = backoff
        self.log = Log("nodeagent", node=self.node)
        self.run_dir = Path(run_dir)
        self.certs_root = self.run_dir / CERTS_DIR
        self.certs_root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.inventory = Inventory()
        self.identities: dict[tuple[str, str], _Identity] = {}
        self.registered: set[str] = set()        # workload ids pilot confirmed
        self._deregister_pending: set[str] = set()
        self.bundle_roots: list[str] | None = None
        self.trust_settle_s = trust_settle_s
        self._roots_since: dict[str, float] = {}  # root PEM -> when we first saw it (0: from the start)
        self._rng = random.Random()
        self._hb_interval = DEFAULT_LEASE / 3
        M.EARLIEST_EXPIRY.set(math.nan)

        verifier = Verifier(keyring.trusted_signers)
        self.pilot_rpc = AsyncRpcClient(loop, pilot.rpc, keyring, pilot.name, origin=self.node,
                                        timeout=rpc_timeout, retries=1)
        self.citadel_rpc = AsyncRpcClient(loop, citadel.rpc, keyring, citadel.name, origin=self.node,
                                          timeout=rpc_timeout, retries=1)
        for client in (self.pilot_rpc, self.citadel_rpc):
            loop.on_close(client.close)
        self.relay = Relay(loop, upstream_pub=pilot.pub, upstream_snapshot=pilot.snapshot, server=pilot.name,
                           prefix=CONFIG_PREFIX, keyring=keyring, verifier=verifier,
                           local_pub=f"ipc://{self.run_dir}/cfg.pub",
                           local_snapshot=f"ipc://{self.run_dir}/cfg.snap", name="nodeagent-relay")
        self.bundle = Subscriber(loop, pub_endpoint=citadel.pub, snapshot_endpoint=citadel.snapshot,
                                 prefix=BUNDLE_KEY, keyring=keyring, server=citadel.name, verifier=verifier,
                                 on_change=self._on_bundle, name="nodeagent-bundle")
        self.local = RpcServer(loop, f"ipc://{self.run_dir}/agent.sock", None,
                               {"add_workload": self._rpc_add, "remove_workload": self._rpc_remove,
                                "status": self._rpc_status}, name="nodeagent-local")
        for sock in ("cfg.pub", "cfg.snap", "agent.sock"):  # 0600: only the proxy's user (and root)
            self._own(self.run_dir / sock, 0o600)
        self.watch = (WorkloadDir(loop, workloads_dir, self._on_file, poll_interval)
                      if workloads_dir is not None else None)
        self._tick_timer = loop.call_every(_TICK, self._tick)
        self._hb_timer = loop.call_later(self._hb_interval, self._heartbeat)
        loop.on_close(self._stop_timers)
        self.log.info("node agent running", run_dir=str(self.run_dir), workloads=str(workloads_dir),
                      pilot=pilot.rpc, citadel=citadel.rpc, owner=f"{self.owner[0]}:{self.owner[1]}")

    def _own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if (os.getuid(), os.getgid()) != self.owner:
            os.chown(path, *self.owner)

    def _stop_timers(self) -> None:
        for timer in (self._tick_timer, self._hb_timer):
            timer.cancel()

    # -- workloads --
    def _on_file(self, name: str, text: str | None) -> None:
        if text is None:
            self._set_unit(f"file:{name}", None)
            return
        try:
            workload = parse_text(text, name)
        except WorkloadError as exc:
            self.log.warning("invalid workload file; its last version stays", file=name, error=str(exc))
            return
        self._set_unit(f"file:{name}", workload)

    def _set_unit(self, unit: str, workload: Workload | None) -> None:
        changes = self.inventory.set(unit, workload)
        for ignored, wid in changes.conflicts:
            self.log.warning("workload id claimed twice; this source is ignored", workload=wid,
                             source=ignored)
        for w in changes.removed:
            self._detach(w)
            self._deregister(w.id)
            self.log.info("workload removed", workload=w.id)
        for old, new in changes.changed:
            if old.identity != new.identity:
                self._detach(old)
                self._attach(new)
            self._register(new)
            self.log.info("workload changed", workload=new.id, source=unit)
        for w in changes.added:
            self._deregister_pending.discard(w.id)
            self._attach(w)
            self._register(w)
            self.log.info("workload added", workload=w.id, source=unit, identity=self._spiffe(w))
        M.WORKLOADS.set(len(self.inventory.current))

    def _spiffe(self, w: Workload) -> str:
        return spiffe_id(self.trust_domain, w.namespace, w.service_account)

    def _attach(self, w: Workload) -> None:
        ident = self.identities.get(w.identity)
        if ident is None:
            initial, cap = self.backoff
            backoff = Backoff(initial=initial, cap=cap, jitter=RETRY_JITTER, rng=self._rng)
            ident = self.identities[w.identity] = _Identity(
                w.identity, self._spiffe(w), Rotation(backoff=backoff, rng=self._rng))
        ident.workloads.add(w.id)
        if ident.certs is not None:  # the identity is already issued: share it at once
            self._write(w.id, ident.certs)

    def _detach(self, w: Workload) -> None:
        ident = self.identities.get(w.identity)
        if ident is not None:
            ident.workloads.discard(w.id)
            if not ident.workloads:
                del self.identities[w.identity]  # its key goes with it
        CertDir(self.certs_root, w.id, self.owner).remove()

    # -- pilot --
    def _register(self, w: Workload) -> None:
        self.pilot_rpc.call("register", w.registration(self.node), lambda r, e: self._registered(w, r, e))

    def _registered(self, w: Workload, reply: Any, error: Exception | None) -> None:
        if self.inventory.current.get(w.id) != w:
            return  # removed or changed meanwhile; the newer request decides
        if error is not None:
            self.registered.discard(w.id)
            self.log.warning("registration failed; retrying at the next heartbeat", workload=w.id,
                             error=str(error))
        else:
            self.registered.add(w.id)
            lease = float((reply or {}).get("lease") or DEFAULT_LEASE)
            if lease / 3 != self._hb_interval:
                self._hb_interval = lease / 3
                self._hb_timer.cancel()
                self._hb_timer = self.loop.call_later(self._hb_interval, self._heartbeat)
            self.log.info("registered with pilot", workload=w.id, group=(reply or {}).get("group", ""))
        M.WORKLOADS_REGISTERED.set(len(self.registered))

    def _deregister(self, wid: str) -> None:
        self.registered.discard(wid)
        M.WORKLOADS_REGISTERED.set(len(self.registered))

        def done(_reply: Any, error: Exception | None) -> None:
            if error is None or wid in self.inventory.current:
                self._deregister_pending.discard(wid)
            else:  # our heartbeats would keep it alive at pilot: try again with the next one
                self._deregister_pending.add(wid)
                self.log.warning("deregistration failed; retrying", workload=wid, error=str(error))
        self.pilot_rpc.call("deregister", {"id": wid}, done)

    def _heartbeat(self) -> None:
        self._hb_timer = self.loop.call_later(self._hb_interval, self._heartbeat)
        for wid in sorted(self._deregister_pending):
            self._deregister(wid)
        if self.inventory.current:
            self.pilot_rpc.call("heartbeat", {"node": self.node}, self._heartbeat_reply)

    def _heartbeat_reply(self, reply: Any, error: Exception | None) -> None:
        if error is not None:
            self.log.warning("heartbeat failed", error=str(error))
            return
        if not (reply or {}).get("renewed"):  # pilot restarted, or our leases ran out
            self.log.info("pilot holds none of our workloads; registering them again",
                          workloads=len(self.inventory.current))
            self.registered.clear()
            todo = list(self.inventory.current.values())
        else:
            todo = [w for wid, w in self.inventory.current.items() if wid not in self.registered]
        for w in todo:
            self._register(w)

    # -- certificates --
    def _tick(self) -> None:
        now = time.time()
        due = []
        for ident in list(self.identities.values()):
            left = ident.rotation.left(now)
            if left is not None and left <= 0 and not ident.expired_logged:
                ident.expired_logged = True
                self.log.error("certificate expired; still asking citadel", identity=ident.spiffe,
                               workloads=",".join(sorted(ident.workloads)))
            # citadel signs only identities pilot knows on this node: ask once one is registered
            if ident.rotation.due(now) and not ident.workloads.isdisjoint(self.registered):
                due.append(ident)
        for start in range(0, len(due), SIGN_BATCH):
            self._request(due[start:start + SIGN_BATCH])
        self._export_expiry(now)

    def _export_expiry(self, now: float) -> None:
        lefts = [left for ident in self.identities.values() if (left := ident.rotation.left(now)) is not None]
        M.EARLIEST_EXPIRY.set(min(lefts) if lefts else math.nan)

    def _request(self, idents: list[_Identity]) -> None:
        """One `sign_batch` for every identity due this tick (a node's workloads often renew together)."""
        keys, bodies = [], []
        for ident in idents:
            key_pem, csr = new_key_and_csr(ident.spiffe)  # the key stays in this process
            ident.rotation.started()
            body: dict[str, Any] = {"csr": csr}
            if self.cert_ttl is not None:
                body["ttl_s"] = self.cert_ttl
            keys.append(key_pem)
            bodies.append(body)

        def done(reply: Any, error: Exception | None) -> None:
            results = reply.get("results") if isinstance(reply, dict) and error is None else None
            if error is None and (not isinstance(results, list) or len(results) != len(idents)):
                error = ValueError(f"sign_batch answered {len(results) if isinstance(results, list) else 0} "
                                   f"results for {len(idents)} requests")
            for i, ident in enumerate(idents):
                self._signed(ident, keys[i], results[i] if error is None else None, error)

        self.citadel_rpc.call("sign_batch", {"requests": bodies}, done)

    def _signed(self, ident: _Identity, key_pem: bytes, reply: Any, error: Exception | None) -> None:
        if self.identities.get(ident.key) is not ident:
            return  # its workloads are gone: so is the key
        now = time.time()
        reason = "refused" if isinstance(error, RpcError) else "unreachable" if error else ""
        if isinstance(reply, dict) and "refused" in reply:  # citadel refuses in its reply, not an error
            error, reason = RpcError(f"{reply['refused']}: {reply.get('detail', '')}"), "refused"
        if error is None:
            try:
                chain = split_pem("".join(reply["chain"]))
                expires = check_leaf(chain, key_pem, ident.spiffe)
                roots = self.bundle_roots or split_pem(reply["root"])
                if not roots:
                    raise ValueError("no trusted roots")
                self._note_roots(split_pem(reply["root"]), now)
            except (KeyError, TypeError, ValueError) as exc:
                error, reason = exc, "bad_reply"
        if error is not None:
            M.RENEWAL_FAILURES.labels(reason).inc()
            delay = ident.rotation.failed(now)
            left = ident.rotation.left(now)
            self.log.warning("certificate request failed; retrying", identity=ident.spiffe, reason=reason,
                             workloads=",".join(sorted(ident.workloads)), error=str(error),
                             retry_in_s=round(delay, 1),
                             cert_left_s="none" if left is None else round(left, 1))
            return
        ident.expired_logged = False
        renew_at = ident.rotation.issued(now, expires)
        certs = CertSet(key_pem, chain, roots)
        settled = [since for root, since in self._roots_since.items() if chains_to(chain, [root])]
        hold = (min(settled) if settled else now) + self.trust_settle_s - now
        if hold > 0:
            ident.held = certs
            self.loop.call_later(hold, lambda: self._release(ident, certs, expires, renew_at))
            self.log.info("certificate held until its root has settled", identity=ident.spiffe,
                          hold_s=round(hold, 1))
            return
        ident.held = None  # a newer certificate supersedes any held one
        self._install(ident, certs, expires, renew_at)

    def _release(self, ident: _Identity, certs: CertSet, expires: float, renew_at: float) -> None:
        if self.identities.get(ident.key) is ident and ident.held is certs:  # else gone, or superseded
            ident.held = None
            self._install(ident, certs, expires, renew_at)

    def _note_roots(self, roots: list[str], now: float) -> None:
        first = not self._roots_since  # the roots we start with: nobody can be behind on them
        for root in roots:
            self._roots_since.setdefault(root, 0.0 if first else now)

    def _install(self, ident: _Identity, certs: CertSet, expires: float, renew_at: float) -> None:
        roots = self.bundle_roots or certs.roots  # the bundle may have changed while the set was held
        if not chains_to(certs.chain, roots):
            roots = [*roots, *(r for r in certs.roots if r not in roots)]
        ident.certs = replace(certs, roots=roots)
        for wid in sorted(ident.workloads):
            self._write(wid, ident.certs)
        M.CERTS_ISSUED.inc()
        now = time.time()
        self._export_expiry(now)
        self.log.info("certificate issued", identity=ident.spiffe,
                      workloads=",".join(sorted(ident.workloads)), version=ident.certs.version,
                      expires_in_s=round(expires - now, 1),
                      renew_in_s=round(renew_at - now, 1))

    def _write(self, wid: str, certs: CertSet, key_too: bool = True) -> None:
        try:
            CertDir(self.certs_root, wid, self.owner).write(certs, key_too)
        except OSError as exc:
            self.log.error("cannot write certificate files", workload=wid, error=str(exc))

    def _on_bundle(self, key: str, value: Any) -> None:
        if key != BUNDLE_KEY or value is None:
            return  # a deleted bundle: keep trusting what we trust
        roots = [r for r in value.get("roots") or [] if isinstance(r, str)] if isinstance(value, dict) else []
        roots = split_pem("".join(roots))
        if not roots:
            self.log.warning("ignoring a trust bundle without roots", version=str(value))
            return
        if roots == self.bundle_roots:
            return
        self.bundle_roots = roots
        self._note_roots(roots, time.time())
        self._roots_since = {r: since for r, since in self._roots_since.items() if r in roots}
        self.log.info("trust bundle", version=value.get("version", ""), roots=len(roots))
        for ident in self.identities.values():
            if ident.certs is None or ident.certs.roots == roots:
                continue
            # A new root means a rotation has begun: citadel now signs with it. A root that only
            # went away (the rotation's end) matters if it was ours, and no request is on its way.
            pending = ident.rotation.in_flight or ident.held is not None
            renew = bool(set(roots) - set(ident.certs.roots)) or (
                not pending and not chains_to(ident.certs.chain, roots))
            ident.certs = replace(ident.certs, roots=roots)
            for wid in sorted(ident.workloads):
                self._write(wid, ident.certs, key_too=False)
            if renew:
                ident.rotation.renew_now()
                self.log.info("re-issuing for the new trust bundle", identity=ident.spiffe)

    # -- local RPC (the per-pod agent) --
    def _rpc_add(self, req: Request) -> dict[str, Any]:
        w = parse_workload(req.body)
        self._set_unit(f"rpc:{w.id}", w)
        return {"id": w.id, "identity": self._spiffe(w), "certs": str(self.certs_root / w.id)}

    def _rpc_remove(self, req: Request) -> dict[str, Any]:
        wid = str((req.body or {}).get("id", ""))
        known = f"rpc:{wid}" in self.inventory.units
        if known:
            self._set_unit(f"rpc:{wid}", None)
        return {"removed": known}

    def _rpc_status(self, req: Request) -> list[dict[str, Any]]:
        now = time.time()
        rows = []
        for wid, w in sorted(self.inventory.current.items()):
            ident = self.identities[w.identity]
            left = ident.rotation.left(now)
            rows.append({"id": wid, "identity": ident.spiffe, "registered": wid in self.registered,
                         "version": ident.certs.version if ident.certs else "",
                         "expires_in_s": None if left is None else round(left, 1)})
        return rows
