"""Istio mutual TLS for the sidecar: the workload's certificates, sockets that speak TLS on the
engine's terms, and a non-blocking handshake on the reactor.

* `WorkloadCerts` reads the node agent's directory (`key.pem`, `cert-chain.pem`, `root-cert.pem`,
  `version`, the version written last) into a server and a client `SSLContext`: TLS 1.3 only, no
  ALPN, the peer's certificate required and verified against the trust bundle (which may hold
  several roots during a rotation). Identity is the SPIFFE URI SAN, not a host name, so
  check_hostname is off and `peer_identity` reads the SAN itself. `maybe_reload` rebuilds the
  contexts when `version` changed (read version, files, version again); on any error the old
  contexts stay. Connections keep the context they started with.
* `TlsSocket` wraps a non-blocking `ssl.SSLSocket` (OpenSSL reads and writes the real fd, so a
  request costs no extra syscalls or copies through Python) with the plain socket's non-blocking
  contract the engine relies on: EAGAIN is BlockingIOError, and a short read means the socket is
  drained. A TLS read returns one record at a time (OpenSSL has no read-ahead here), so
  `read`/`recv_into` read on while the kernel holds more (FIONREAD) and the buffer has room:
  edge-triggered epoll then never strands bytes in the kernel or in OpenSSL. A write either takes
  everything or raises BlockingIOError (OpenSSL keeps what it encrypted; the engine offers the same
  bytes again, which is what SSL_write needs). There is no splice through TLS: callers check
  `is_tls`. A half-close is a TCP FIN without close_notify (see `TlsSocket.shutdown`).
* `Handshake` drives `do_handshake` on the reactor (edge-triggered IN|OUT, retried on any event)
  under a timeout and reports the verified peer SPIFFE id, or why it failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import ssl
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from bus.logs import BurstLog, Log
from dataplane.proxy.reactor import EPOLLET, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor
from meshapi.identity import CHAIN_FILE, KEY_FILE, ROOT_FILE, SCHEME, VERSION_FILE

HANDSHAKE_TIMEOUT = 10.0
ISTIO_MUTUAL = "ISTIO_MUTUAL"
_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_ioctl, _FIONREAD, _ZERO = fcntl.ioctl, termios.FIONREAD, b"\0\0\0\0"
_RECORD_HEADER = 5  # content type, version, length (2 bytes, big-endian)

_log = Log("proxy.tls")
_refusals = BurstLog(_log)


class CertError(Exception):
    """The certificate directory cannot be used (missing, unreadable, inconsistent or invalid)."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror or exc}") from exc


def cert_identity(pem: bytes) -> str:
    """The SPIFFE id (URI SAN) of the first certificate in `pem`."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CertError(f"the leaf certificate has no usable SAN: {exc}") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(SCHEME)]
    if not uris:
        raise CertError("the leaf certificate has no spiffe:// URI SAN")
    return uris[0]


def peer_identity(sock: ssl.SSLSocket) -> str:
    """The verified peer's SPIFFE id ("" when its certificate names none)."""
    cert = sock.getpeercert() or {}
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(SCHEME):
            return value
    return ""


def _context(purpose: int, chain: Path, key: Path, roots_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identity is the URI SAN, checked by the caller
    else:
        ctx.num_tickets = 1  # not for resumption: it tells the client we accepted its certificate
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # a FIN is the end of a direction (half-close), see shutdown
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii", "replace"))
    return ctx


class WorkloadCerts:
    """The workload's certificate directory and the SSLContexts built from its current version."""

    def __init__(self, directory: str | os.PathLike[str], log: Log | None = None) -> None:
        self.dir = Path(directory)
        self.log = log or _log
        self.version = ""
        self.principal = ""
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        self._problem = ""  # the last failure logged: a directory that stays broken is said once

    def load(self) -> None:
        """Build both contexts from the files, all of one version; CertError if that fails."""
        version = _read(self.dir / VERSION_FILE).strip().decode(errors="replace")
        roots = _read(self.dir / ROOT_FILE)
        chain_pem = _read(self.dir / CHAIN_FILE)
        chain, key = self.dir / CHAIN_FILE, self.dir / KEY_FILE
        try:  # each file is swapped in whole (rename); the version read again says they belong together
            server = _context(ssl.PROTOCOL_TLS_SERVER, chain, key, roots)
            client = _context(ssl.PROTOCOL_TLS_CLIENT, chain, key, roots)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise CertError(f"unusable certificates: {exc}") from exc
        if _read(self.dir / VERSION_FILE).strip().decode(errors="replace") != version:
            raise CertError("the certificates changed while being read")
        principal = cert_identity(chain_pem)
        self.server, self.client, self.principal, self.version = server, client, principal, version

    def maybe_reload(self) -> bool:
        """Reload when `version` changed; True when new contexts are in force. Errors are logged and
        the old contexts kept (the agent rewrites the files; the next tick tries again)."""
        try:
            try:
                version = (self.dir / VERSION_FILE).read_bytes().strip().decode(errors="replace")
            except FileNotFoundError:
                if self.version:
                    return False  # the node agent removes `version` first while it writes a new set
                raise
            if version == self.version:
                return False
            self.load()
        except (OSError, CertError) as exc:
            problem = str(exc)
            if problem != self._problem:
                self._problem = problem
                self.log.warning("cannot load certificates, keeping what is in force", dir=str(self.dir),
                                 loaded=self.version or "-", error=problem)
            return False
        self._problem = ""
        self.log.info("certificates loaded", dir=str(self.dir), version=self.version,
                      principal=self.principal)
        return True


class TlsSocket:
    """A non-blocking SSLSocket behaving like a non-blocking plain socket for the engine."""

    __slots__ = ("_eof", "_read", "_write", "early", "fd", "principal", "ssl")

    is_tls = True

    def __init__(self, sock: ssl.SSLSocket, principal: str) -> None:
        self.ssl = sock
        self.fd = sock.fileno()
        self.principal = principal  # the verified peer's SPIFFE id
        self.early = b""  # what a confirmed client handshake read past the server's ticket (see Handshake)
        # the C methods behind SSLSocket.read/write (skipping ssl.py's per-call checks); a TLS EOF,
        # with or without close_notify (OP_IGNORE_UNEXPECTED_EOF), reads as b""
        self._read = sock._sslobj.read  # type: ignore[union-attr]
        self._write = sock._sslobj.write  # type: ignore[union-attr]
        self._eof = False

    def fileno(self) -> int:
        return self.fd

    def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only when the kernel holds no more (drained) or at the end."""
        if self._eof:
            return b""
        read = self._read
        try:
            data = read(n)
        except _WANT:
            raise BlockingIOError from None
        got = len(data)
        if not got:
            self._eof = True
            return data
        if got == n or not self._queued():
            return data
        parts = [data]
        while got < n:  # another record waits in the kernel: no new edge would say so
            try:
                more = read(n - got)
            except _WANT:
                break
            except OSError:
                break  # the error shows again on the next read, after these bytes are passed on
            if not more:
                self._eof = True
                break
            parts.append(more)
            got += len(more)
            if not self._queued():
                break
        return b"".join(parts)

    recv = read

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        """As `read`, into `buf` (a memoryview or bytearray)."""
        if self._eof:
            return 0
        view = memoryview(buf)
        n = nbytes or len(view)
        read = self._read
        try:
            got = read(n, view)
        except _WANT:
            raise BlockingIOError from None
        if not got:
            self._eof = True
            return 0
        while got < n and self._queued():
            try:
                more = read(n - got, view[got:])
            except _WANT:
                break
            except OSError:
                break
            if not more:
                self._eof = True
                break
            got += more
        return got

    def _queued(self) -> bool:
        """Whether the kernel holds unread bytes: OpenSSL reads exactly one record per call (no
        read-ahead), so after a short read this tells "drained" without a failing read (an
        SSLWantReadError costs several times this ioctl)."""
        return _ioctl(self.fd, _FIONREAD, _ZERO) != _ZERO

    def send(self, data: Any) -> int:
        """All of `data`, or BlockingIOError (offer the same bytes again on EPOLLOUT)."""
        if not data:
            return 0
        try:
            return self._write(data)
        except _WANT:
            raise BlockingIOError from None

    write = send

    def shutdown(self, how: int) -> None:
        """The TCP half-close only: SSLSocket.shutdown would drop TLS for the rest of the connection,
        and Python sends close_notify only through unwrap(), which ends reading too. The peer's
        OpenSSL (OP_IGNORE_UNEXPECTED_EOF) reads the FIN as the end of this direction and can still
        write the other, as a half-closed TCP connection carried at L4 needs."""
        socket.socket.shutdown(self.ssl, how)

    def close(self) -> None:
        self.ssl.close()

    def getpeername(self) -> Any:
        return self.ssl.getpeername()

    def getsockname(self) -> Any:
        return self.ssl.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self.ssl.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self.ssl.getsockopt(*args)


def whole_record(sock: ssl.SSLSocket) -> bool:
    """Whether the kernel holds a whole TLS record for `sock` (or its end): one read then takes in
    that record, so an SSLWantReadError after it means the record held no application data. It
    peeks at the record header instead of asking OpenSSL whether a session ticket came: reading
    `SSLSocket.session` leaks a copy of the session on each access before CPython 3.12.7
    (python/cpython#116810), ~6 KiB per upstream mTLS connection."""
    try:
        head = socket.socket.recv(sock, _RECORD_HEADER, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    if len(head) < _RECORD_HEADER:
        return not head  # the end: the read reports it; part of a header: wait for the rest
    queued = int.from_bytes(_ioctl(sock.fileno(), _FIONREAD, _ZERO), sys.byteorder)
    return queued >= _RECORD_HEADER + int.from_bytes(head[3:5], "big")


def is_tls(sock: Any) -> bool:
    return getattr(sock, "is_tls", False)


def io_funcs(sock: Any) -> tuple[Callable[[int], bytes], Callable[[Any], int]]:
    """(read(n), write(data)) for `sock`: os.read/os.write on the fd, or the TLS socket's own."""
    if is_tls(sock):
        return sock.read, sock.send
    fd = sock.fileno()
    return functools.partial(os.read, fd), functools.partial(os.write, fd)


def mutual_tls(spec: dict[str, Any] | None, ep: Any) -> frozenset[str] | None:
    """For a cluster's `tls` and one of its endpoints: the SPIFFE ids the server may present when
    Istio mTLS applies (empty: any the trust bundle verifies), or None for plain text. With `auto`
    (Istio's auto mTLS) only endpoints whose `tls_mode` is "istio" get mTLS."""
    if not spec or spec.get("mode") != ISTIO_MUTUAL or (spec.get("auto") and ep.tls_mode != "istio"):
        return None
    names = spec.get("subject_alt_names") or ([ep.service_account] if ep.service_account else [])
    return frozenset(names)


def check_identity(got: str, allowed: frozenset[str]) -> bool:
    """Istio's SAN check: the presented SPIFFE id must be one the cluster (or endpoint) names."""
    return not allowed or got in allowed


def log_refused(address: tuple[str, int], allowed: frozenset[str], presented: str, reason: str,
                **fields: Any) -> None:
    """One line for an upstream refused over mTLS, naming both identities (expected, presented: "-"
    when the handshake failed before any was verified); repeats of one refusal are summarised."""
    _refusals.event(f"{address[0]}:{address[1]} {reason}", "upstream refused over mutual TLS",
                    endpoint=f"{address[0]}:{address[1]}", expected=",".join(sorted(allowed)) or "*",
                    presented=presented or "-", error=reason, **fields)


class Handshake:
    """One TLS handshake on `reactor`: `done(tls_socket, "")` on success, `done(None, reason)` on
    failure or timeout (possibly before the constructor returns).

    `register=True`: an accepted socket nobody watches yet; the handshake registers it, and
    unregisters (and on failure closes) it before `done`. `register=False`: the caller's
    edge-triggered IN|OUT registration is borrowed (its callback pointed here) and left for the
    caller to take back or close.

    `confirm` (the client side): under TLS 1.3 the client's handshake completes before the server
    has checked the client's certificate, so a refusal would only show on the first read, as a
    reset after the request went out (UR, not UF). A confirmed handshake waits for the server's
    first record after it: its session ticket (our servers send one, as Envoy's do) or its alert.
    A byte of application data instead (a server-first protocol) ends the wait too; it is handed
    over as `TlsSocket.early`."""

    __slots__ = ("confirm", "done", "fd", "reactor", "registered", "sock", "timer")

    def __init__(self, reactor: Reactor, sock: ssl.SSLSocket, done: Callable[[TlsSocket | None, str], Any],
                 *, register: bool, confirm: bool = False, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.done = done
        self.registered = register
        self.confirm = confirm
        if register:
            reactor.register(self.fd, _MASK, self._on_event)
        else:
            reactor.set_callback(self.fd, self._on_event)
        self.timer = reactor.call_later(timeout, self._on_timeout)
        self._on_event(EPOLLOUT)

    def _on_event(self, _mask: int) -> None:
        if self.timer is None:
            return
        sock = self.sock
        early = b""
        try:
            sock.do_handshake()
            if self.confirm:
                if not whole_record(sock):
                    return
                try:
                    early = sock._sslobj.read(1)  # type: ignore[union-attr]  # takes in the ticket
                except ssl.SSLWantReadError:
                    pass  # a whole record and no application data in it: the server's ticket
                else:
                    if not early:
                        self._fail("connection_closed")
                        return
        except _WANT:
            return
        except ssl.SSLError as exc:
            self._fail(exc.reason or exc.__class__.__name__)
            return
        except OSError as exc:
            self._fail(os.strerror(exc.errno) if exc.errno else "connection_closed")
            return
        self.timer.cancel()
        self.timer = None
        if self.registered:
            self.reactor.unregister(self.fd)  # the new owner registers the fd its own way
        tls_sock = TlsSocket(sock, peer_identity(sock))
        tls_sock.early = early
        self.done(tls_sock, "")

    def _on_timeout(self) -> None:
        self._fail("handshake_timeout")

    def _fail(self, reason: str) -> None:
        if self.timer is None:
            return
        self.timer.cancel()
        self.timer = None
        if self.registered:
            self.reactor.unregister(self.fd)
            sock = self.sock
            self.reactor.call_soon(lambda: _close(sock))  # after this batch: the fd number is not reused
        self.done(None, reason)


def _close(sock: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
