"""Fuzz the HTTP/1.1 codec: a million inputs, no crash, no hang, bounded time per input.

Inputs are valid messages and random mutations of them (flipped, inserted, deleted and duplicated
bytes, and splices of framing tokens such as CRLFs, chunk sizes, Content-Length and
Transfer-Encoding lines), plus plain random bytes, each cut at random points into several
feeds (sometimes one byte per feed), for both parsers, with or without EOF at the end.
After each feed every event is pulled; PAUSED is answered with start_tunnel() or resume().

A crash is any exception other than the codec's HTTPError, a run of events that does not
consume input (more events than 2x the bytes fed: a loop), a result that changes when the same
bytes come in one feed instead (events with adjacent data merged, outcome and error status), or
a valid, unmutated input being refused. Every input is timed (the split run); the slowest
few are re-timed afterwards (best of several runs) so that "max time per input" reports the
codec, not a scheduler hiccup. Prints a table, then one JSON line; exits 1 on any crash.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataplane.proxy.http import (  # noqa: E402
    CLOSED,
    NEED_DATA,
    PAUSED,
    Data,
    EndOfMessage,
    HTTPError,
    RequestParser,
    ResponseParser,
    TunnelData,
)

REQUESTS = [
    b"GET /plaintext HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"POST /api HTTP/1.1\r\nHost: svc\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    b"{\"a\": [1, 2]}",
    b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6 ; q=\"a;b\"\r\n world\r\n0\r\nX-Sum: 9\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x00\x00\x08",
    b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"\r\nDELETE /x?y=1 HTTP/1.1\r\nHost: a\r\nX-Pad:  \t v \t\r\nX-Obs: caf\xe9\r\n\r\n",
]
RESPONSES = [
    ([b"GET"], b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Length: 13\r\n\r\nHello, World!"),
    ([b"GET", b"HEAD"], b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\nT: 1\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
    ([b"POST"], b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"),
    ([b"GET"], b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil the end"),
    ([b"GET", b"GET"], b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
    ([b"GET"], b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
               b"\x81\x00"),
    ([b"CONNECT"], b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x01"),
]
TOKENS = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b":", b" ", b"\t", b";", b",", b"\"", b"\\", b"\x00", b"\x7f",
    b"\xff",
    b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"5\r\n", b";a=\"b\"", b"\r\n \r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Content-Length: 1, 2\r\n", b"Connection: close\r\n",
    b"Connection: upgrade\r\nUpgrade: x\r\n", b"Expect: 100-continue\r\n", b"Host: b\r\n",
    b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 200 OK\r\n", b"GET / HTTP/1.1\r\n", b"CONNECT ",
]
SPECIAL = b"\r\n:; \t,0123456789abcdefABCDEF\"\x00\x80"
KINDS = ["mutated request", "mutated response", "random bytes, requests", "random bytes, responses",
         "valid, split"]
TUNNELS = (4, 5)  # REQUESTS after which the rest of the stream is tunnel data


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        op = rng.random()
        if op < 0.15 and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif op < 0.3 and at < len(out):
            out[at] = rng.choice(SPECIAL)
        elif op < 0.45:
            out[at:at] = bytes([rng.randrange(256)])
        elif op < 0.65:
            out[at:at] = rng.choice(TOKENS)
        elif op < 0.8:
            del out[at:at + rng.randint(1, 16)]
        elif op < 0.95:
            end = min(len(out), at + rng.randint(1, 64))
            out[end:end] = out[at:end]
        else:
            del out[at:]
    return bytes(out)


def make_input(rng: random.Random) -> tuple[str, bool, list[bytes], list[bytes], bool]:
    """(kind, request side?, methods sent, feeds, eof)."""
    kind = rng.choices(KINDS, weights=(35, 25, 15, 15, 10))[0]
    request_side = kind in (KINDS[0], KINDS[2]) or (kind == KINDS[4] and rng.random() < 0.6)
    methods: list[bytes] = []
    if kind == KINDS[4]:
        if request_side:
            plain = [r for i, r in enumerate(REQUESTS) if i not in TUNNELS]
            seeds = rng.choices(plain, k=rng.randint(1, 3))
            if rng.random() < 0.3:
                seeds.append(REQUESTS[rng.choice(TUNNELS)])
            data = b"".join(seeds)
        else:
            methods, data = rng.choice(RESPONSES)
    elif kind == KINDS[0]:
        data = mutate(rng, b"".join(rng.choices(REQUESTS, k=rng.randint(1, 3))))
    elif kind == KINDS[1]:
        methods, data = rng.choice(RESPONSES)
        data = mutate(rng, data)
    else:
        data = rng.randbytes(rng.randint(0, 200))
        if rng.random() < 0.5:
            data = (b"GET / HTTP/1.1\r\n" if request_side else b"HTTP/1.1 200 OK\r\n") + data
        methods = rng.choices([b"GET", b"HEAD", b"POST", b"CONNECT"], k=rng.randint(0, 2))
    if len(data) < 300 and rng.random() < 0.05:
        feeds = [data[i:i + 1] for i in range(len(data))]
    else:
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 6)))
        feeds = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return kind, request_side, methods, feeds, rng.random() < 0.5


def run_one(request_side: bool, methods: list[bytes], feeds: list[bytes], eof: bool,
            flip: int) -> tuple[str, list[Any]]:
    """Parse one input: (outcome, events with adjacent data merged); raises on a crash."""
    parser: RequestParser | ResponseParser = RequestParser() if request_side else ResponseParser()
    if isinstance(parser, ResponseParser):
        for method in methods:
            parser.request_sent(method)
    fed = 0
    events: list[Any] = []
    outcome = "incomplete"
    try:
        for piece in [*feeds, None] if eof else feeds:
            if piece is None:
                parser.feed_eof()
            elif piece:
                parser.feed(piece)
                fed += len(piece)
            while True:
                ev = parser.next_event()
                if ev is PAUSED:
                    parser.start_tunnel() if flip else parser.resume()  # type: ignore[union-attr]
                    continue
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    outcome = "closed"
                    break
                if isinstance(ev, Data | TunnelData) and events and type(events[-1]) is type(ev):
                    events[-1] = type(ev)(events[-1].data + ev.data)
                else:
                    events.append(ev)
                    if len(events) > 2 * fed + 4:
                        raise AssertionError(f"{len(events)} events from {fed} bytes: no progress")
                if isinstance(ev, TunnelData):
                    outcome = "tunnel"
    except HTTPError as err:
        if parser.state != "ERROR":
            raise AssertionError("HTTPError left the parser alive") from err
        return f"error {err.status}", events
    if outcome == "incomplete" and any(isinstance(ev, EndOfMessage) for ev in events):
        outcome = "complete"
    return outcome, events


def check_one(kind: str, request_side: bool, methods: list[bytes], feeds: list[bytes], eof: bool,
              flip: int) -> str:
    """Run one input, then check it against the same bytes in a single feed (the split must not
    change events nor outcome), and that valid input is accepted. Returns the outcome."""
    outcome, events = run_one(request_side, methods, feeds, eof, flip)
    if len(feeds) > 1:
        whole = run_one(request_side, methods, [b"".join(feeds)], eof, flip)
        if whole != (outcome, events):
            raise AssertionError(f"split into {len(feeds)} feeds: {outcome} != {whole[0]}, or events differ")
    if kind == KINDS[4] and outcome.startswith("error"):
        raise AssertionError(f"valid input refused: {outcome}")
    return outcome


def worker(seed: int, count: int) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    crashes: list[dict[str, Any]] = []
    slow: list[tuple[int, tuple[Any, ...]]] = []
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(count):
        kind, request_side, methods, feeds, eof = make_input(rng)
        flip = 1 if kind == KINDS[4] else rng.randrange(2)  # valid tunnels carry no HTTP after PAUSED
        t0 = clock()
        try:
            outcomes[check_one(kind, request_side, methods, feeds, eof, flip)] += 1
        except Exception as err:  # a crash: keep going, report it
            outcomes["CRASH"] += 1
            if len(crashes) < 5:
                crashes.append({"kind": kind, "error": repr(err), "input": repr(b"".join(feeds)[:300]),
                                "feeds": len(feeds), "eof": eof, "trace": traceback.format_exc(limit=4)})
        took = clock() - t0
        if len(slow) < 5 or took > slow[0][0]:
            slow.append((took, (kind, request_side, methods, feeds, eof, flip)))
            slow.sort(key=lambda s: s[0])
            del slow[:-5]
    return {"inputs": count, "seconds": (clock() - start) / 1e9, "outcomes": outcomes, "crashes": crashes,
            "slow": slow}


def retime(case: tuple[Any, ...], repeats: int = 7) -> float:
    """Best-of time of one input, in µs (the max of first timings includes scheduling noise)."""
    _kind, request_side, methods, feeds, eof, flip = case
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        with contextlib.suppress(Exception):  # a crash is already counted
            run_one(request_side, methods, feeds, eof, flip)
        best = min(best, time.perf_counter_ns() - t0)
    return best / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="50,000 inputs instead of 1,000,000")
    parser.add_argument("--inputs", type=int, help="number of inputs (overrides --quick)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    total = args.inputs or (50_000 if args.quick else 1_000_000)
    workers = max(1, min(args.workers, total))
    shares = [total // workers + (i < total % workers) for i in range(workers)]

    print(f"fuzzing {total:,} inputs on {workers} worker(s), seed {args.seed}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if workers == 1:
        results = [worker(args.seed, total)]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.starmap(worker, [(args.seed * 1000 + i, n) for i, n in enumerate(shares)])
    wall = time.perf_counter() - start

    outcomes: Counter[str] = Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    crashes = [c for r in results for c in r["crashes"]]
    slow = sorted((s for r in results for s in r["slow"]), key=lambda s: s[0])[-5:]
    first_max = slow[-1][0] / 1e3 if slow else 0.0
    retimed = [(retime(case), case) for _, case in slow]
    worst_us, worst = max(retimed, key=lambda r: r[0]) if retimed else (0.0, None)
    per_worker = sum(r["inputs"] for r in results) / max(r["seconds"] for r in results) / workers

    print(f"\n{'inputs':34s} {total:>12,}")
    print(f"{'inputs/s (all workers)':34s} {total / wall:>12,.0f}")
    print(f"{'inputs/s per worker':34s} {per_worker:>12,.0f}")
    print(f"{'mean µs per input':34s} {wall * workers / total * 1e6:>12.1f}")
    print(f"{'max µs per input (first timing)':34s} {first_max:>12.1f}")
    print(f"{'max µs per input (re-timed)':34s} {worst_us:>12.1f}")
    if worst is not None:
        size = sum(map(len, worst[3]))
        print(f"{'  slowest input':34s} {worst[0]}, {size:,} bytes in {len(worst[3])} feeds")
    print(f"{'crashes':34s} {outcomes['CRASH']:>12,}")
    print("\noutcome")
    for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s} {n:>12,}")
    for crash in crashes:
        print(f"\nCRASH ({crash['kind']}): {crash['error']}\n  input {crash['input']}\n{crash['trace']}")
    print(json.dumps({"benchmark": "fuzz_http_codec", "inputs": total, "workers": workers, "seed": args.seed,
                      "inputs_per_s": round(total / wall), "inputs_per_s_per_worker": round(per_worker),
                      "max_us_first": round(first_max, 1), "max_us_retimed": round(worst_us, 1),
                      "crashes": outcomes["CRASH"], "outcomes": dict(outcomes)}))
    return 1 if outcomes["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main())
