"""The proxy's supervisor side of its workers: fork them, fan a request out, gather replies.

Workers are forked before the supervisor starts any thread or ZeroMQ context (forking a
process with threads copies locks in whatever state they were in).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any

from dataplane.proxy.control import FrameReader, frame
from dataplane.proxy.worker import WorkerOptions, run_worker


class WorkerError(RuntimeError):
    pass


class Workers:
    def __init__(self, count: int, opts: WorkerOptions) -> None:
        self.pids: list[int] = []
        self._ctrl: list[socket.socket] = []
        self._readers: list[FrameReader] = []
        self._lock = threading.Lock()
        for index in range(count):
            parent, child = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                parent.close()
                for other in self._ctrl:
                    other.close()
                run_worker(index, child, opts)  # never returns
            child.close()
            self.pids.append(pid)
            self._ctrl.append(parent)
            self._readers.append(FrameReader())

    def request(self, message: dict[str, Any], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Send `message` to every worker and return their replies, in worker order."""
        data = frame(message)
        with self._lock:
            for sock in self._ctrl:
                sock.sendall(data)
            return [self._read(i, time.monotonic() + timeout) for i in range(len(self._ctrl))]

    def _read(self, index: int, deadline: float) -> dict[str, Any]:
        sock, reader = self._ctrl[index], self._readers[index]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"worker {index} did not answer in time")
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            data = sock.recv(1 << 20)
            if not data:
                raise WorkerError(f"worker {index} (pid {self.pids[index]}) is gone")
            replies = reader.feed(data)
            if replies:
                return replies[0]  # one request in flight per worker: at most one reply

    def alive(self) -> bool:
        for pid in self.pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return False
            if done:
                return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        for sock in self._ctrl:
            sock.close()  # a worker exits when its control channel closes
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                time.sleep(0.01)
            else:
                try:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
