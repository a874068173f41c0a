"""The programs the namespace tests run inside their namespaces (`python -m tests.init.nsapp ...`).

    serve TAG HOST:PORT...     answer each connection with one JSON line: who answered (TAG), the peer,
                               where the client meant to go (SO_ORIGINAL_DST, "-" when not redirected)
    connect HOST PORT MSG [TIMEOUT]
                               print one JSON line: our own address, the reply or the error, and how long
                               it took; a reply whose peer is our own address came without a proxy between
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    else:
        connect(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 5.0)
