"""The programs the namespace tests run inside their namespaces (`python -m tests.init.nsapp ...`).

    serve TAG HOST:PORT...     answer each connection with one JSON line: who answered (TAG), the peer,
                               where the client meant to go (SO_ORIGINAL_DST, "-" when not redirected)
    connect HOST PORT MSG [TIMEOUT]
                               print one JSON line: our own address, the reply or the error, and how long
                               it took; a reply whose peer is our own address came without a proxy between
    stream HOST PORT THREADS STOPFILE
                               new connections (one request each) from THREADS threads until STOPFILE
                               exists (at most 120 s); prints "streaming" once the first succeeded, then
                               one JSON line: ok, failed, the first errors, and how many went direct
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import threading
import time

from dataplane.proxy import sockets


def serve(tag: str, addrs: list[str]) -> None:
    sel = selectors.DefaultSelector()
    for addr in addrs:
        host, port = sockets.parse_hostport(addr)
        sel.register(sockets.listener(host, port, reuseport=False), selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            try:
                conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            with conn:
                conn.setblocking(True)
                conn.settimeout(2)
                try:
                    data = conn.recv(1024)
                    orig = sockets.original_dst(conn)
                    local = conn.getsockname()
                    conn.sendall(json.dumps({"tag": tag, "local": f"{local[0]}:{local[1]}",
                                             "peer": f"{peer[0]}:{peer[1]}",
                                             "orig": "-" if orig is None else f"{orig[0]}:{orig[1]}",
                                             "data": data.decode()}).encode())
                except OSError:
                    pass


def connect(host: str, port: int, msg: str, timeout: float) -> None:
    start = time.monotonic()
    result: dict[str, object] = {}
    try:
        with socket.create_connection((host, port), timeout=timeout) as c:
            local = c.getsockname()
            result["local"] = f"{local[0]}:{local[1]}"
            c.sendall(msg.encode())
            c.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := c.recv(4096):
                chunks.append(chunk)
        result.update(ok=True, reply=json.loads(b"".join(chunks)))
    except (OSError, ValueError) as exc:
        result.update(ok=False, error=type(exc).__name__, detail=str(exc))
    result["elapsed"] = time.monotonic() - start
    print(json.dumps(result), flush=True)


def _once(host: str, port: int) -> dict[str, object]:
    with socket.create_connection((host, port), timeout=5) as c:
        local = c.getsockname()
        c.sendall(b"stream")
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := c.recv(4096):
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks))
    return {"direct": reply["peer"] == f"{local[0]}:{local[1]}"}


def stream(host: str, port: int, threads: int, stopfile: str) -> None:
    counts = {"ok": 0, "failed": 0, "direct": 0, "errors": []}
    lock = threading.Lock()
    first = threading.Event()
    deadline = time.monotonic() + 120

    def loop() -> None:
        while not os.path.exists(stopfile) and time.monotonic() < deadline:
            try:
                result = _once(host, port)
            except (OSError, ValueError) as exc:
                with lock:
                    counts["failed"] += 1  # type: ignore[operator]
                    if len(counts["errors"]) < 5:  # type: ignore[arg-type]
                        counts["errors"].append(f"{type(exc).__name__}: {exc}")  # type: ignore[union-attr]
                continue
            with lock:
                counts["ok"] += 1  # type: ignore[operator]
                counts["direct"] += int(bool(result["direct"]))  # type: ignore[operator]
            if not first.is_set():
                first.set()
                print("streaming", flush=True)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "stream":
        stream(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        connect(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 5.0)
