"""Citadel's I/O shell: the CA's RPC methods on a CURVE ROUTER, its trust bundle on a signed publisher.

RPC (every caller is authenticated by CURVE; `Request.peer` is its key name):

- `sign` {"csr": PEM, "ttl_s"?: int} -> {"chain", "root", "expires", "ttl_s", "serial", "spiffe_id",
  "note"?} or {"refused": code, "detail"}. The caller is the node in node authorization.
- `sign_batch` {"requests": [sign body, ...]} (at most MAX_BATCH) -> {"results": [sign reply, ...]}
  in the same order: a node agent renewing many workloads at once pays the bus once, not per CSR.
- `rotate_root` {} -> {"fingerprint", "subject", "identities", "phase"}; admins only.
- `status` {} -> see CertificateAuthority.status.

Published: `ca/bundle` = {"roots": [PEM, ...], "version": hash}, again whenever it changes.
Build it in the loop thread (`loop.call_sync(lambda: Citadel(...))`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from bus.keys import Keyring
from bus.loop import Loop
from bus.pubsub import Publisher
from bus.rpc import Request, RpcServer
from controlplane.citadel.ca import CertificateAuthority

BUNDLE_KEY = "ca/bundle"
MAX_BATCH = 256


class Citadel:
    def __init__(self, loop: Loop, ca: CertificateAuthority, publisher: Publisher,
                 admins: Iterable[str] = ("meshctl",), clock: Callable[[], float] = time.time) -> None:
        self.loop = loop
        self.ca = ca
        self.publisher = publisher
        self.admins = frozenset(admins)
        self.clock = clock
        self.log = ca.log
        self._published = ""
        self.tick()
        self._timer = loop.call_every(1.0, self.tick)
        loop.on_close(self.close)

    def rpc_handlers(self) -> dict[str, Callable[[Request], Any]]:
        return {"sign": self._sign, "sign_batch": self._sign_batch, "rotate_root": self._rotate_root,
                "status": self._status}

    def tick(self) -> None:
        self.ca.tick(self.clock())
        self._publish_if_changed()

    def close(self) -> None:
        self._timer.cancel()
        self.ca.tick(self.clock())  # saves the issuance records

    def _publish_if_changed(self) -> None:
        if self.ca.bundle_version != self._published:
            self._published = self.ca.bundle_version
            self.publisher.set(BUNDLE_KEY, self.ca.bundle(), config_version=self._published)

    def _sign(self, req: Request) -> dict[str, Any]:
        result = self.ca.sign(req.peer, req.body, self.clock())
        self._publish_if_changed()  # the last re-issue of a rotation retires the old root
        return result.reply()

    def _sign_batch(self, req: Request) -> dict[str, Any]:
        requests = req.body.get("requests") if isinstance(req.body, dict) else None
        if not isinstance(requests, list) or not 0 < len(requests) <= MAX_BATCH:
            raise ValueError(f'the body must be {{"requests": [1 to {MAX_BATCH} sign bodies]}}')
        now = self.clock()
        results = [self.ca.sign(req.peer, body, now).reply() for body in requests]
        self._publish_if_changed()
        return {"results": results}

    def _rotate_root(self, req: Request) -> dict[str, Any]:
        if req.peer not in self.admins:
            self.log.warning("rotate_root refused", peer=req.peer, admins=",".join(sorted(self.admins)))
            raise PermissionError(f"{req.peer or 'an unauthenticated peer'} is not a citadel admin")
        reply = self.ca.rotate_root(self.clock())
        self._publish_if_changed()
        return reply

    def _status(self, req: Request) -> dict[str, Any]:
        return self.ca.status(self.clock())


def serve_rpc(loop: Loop, citadel: Citadel, endpoint: str, keyring: Keyring) -> RpcServer:
    return RpcServer(loop, endpoint, keyring, citadel.rpc_handlers(), name="citadel")
