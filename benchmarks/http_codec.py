"""HTTP/1.1 codec micro-benchmark: parse cost per message, zmesh's codec vs httptools.

Each workload feeds the same bytes to a long-lived parser (one keep-alive connection) and
pulls every event, so the cost covers everything the proxy gets: head with lower-cased
fields and the framing/keep-alive/host fields, body pieces, end of message. The baseline,
in the same run, is httptools (llhttp in C) with the callbacks a proxy needs to get the same
information: URL or status, the header list with lower-cased names, method/status and
keep-alive at headers-complete, body pieces, message-complete. httptools does not validate
as strictly nor extract Content-Length/Host/Upgrade/Expect for the proxy; zmesh's codec does.
Without httptools installed (`pip install httptools`) the baseline columns are skipped.

Times are CPU time (time.process_time: steadier than wall time on a busy machine): the best of
many short slices, zmesh and httptools taking turns, in microseconds per message; "ratio" is
zmesh / httptools (lower is better).
Serializer costs are printed too, without a baseline. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataplane.proxy.http import (  # noqa: E402
    NEED_DATA,
    RequestParser,
    ResponseParser,
    error_response,
    request_head,
    response_head,
)

try:
    import httptools
except ImportError:  # the baseline is optional
    httptools = None

GET = (b"GET /plaintext HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: wrk/4.2\r\n"
       b"Accept: text/plain,*/*\r\nConnection: keep-alive\r\n\r\n")
POST = (b"POST /api/v1/items HTTP/1.1\r\nHost: svc.ns.svc.cluster.local\r\nContent-Type: application/json\r\n"
        b"Content-Length: 256\r\n\r\n" + b"x" * 256)
CHUNKED_REQ = (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (n, b"y" * n) for n in (100, 200, 50)) + b"0\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: app\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!")
CHUNKED_RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (n, b"z" * n) for n in (512, 512, 100)) + b"0\r\n\r\n")
PIPELINE = 16

# name, bytes per feed, messages per feed, request side?
WORKLOADS = [
    ("request GET (5 fields)", GET, 1, True),
    (f"request GET x{PIPELINE} pipelined", GET * PIPELINE, PIPELINE, True),
    ("request POST 256 B (CL)", POST, 1, True),
    ("request POST chunked 350 B", CHUNKED_REQ, 1, True),
    ("response 200 13 B (CL)", RESPONSE, 1, False),
    (f"response 200 x{PIPELINE} pipelined", RESPONSE * PIPELINE, PIPELINE, False),
    ("response chunked 1.1 KB", CHUNKED_RESP, 1, False),
]


def zmesh_runner(data: bytes, messages: int, request_side: bool) -> Callable[[int], None]:
    """A loop feeding `data` n times into one parser and pulling every event."""
    if request_side:
        req = RequestParser()

        def run(n: int) -> None:
            feed, next_event = req.feed, req.next_event
            for _ in range(n):
                feed(data)
                while next_event() is not NEED_DATA:
                    pass
        return run

    resp = ResponseParser()

    def run_responses(n: int) -> None:
        feed, next_event, sent = resp.feed, resp.next_event, resp.request_sent
        for _ in range(n):
            for _ in range(messages):
                sent(b"GET")
            feed(data)
            while next_event() is not NEED_DATA:
                pass
    return run_responses


class _Collector:
    """httptools callbacks that gather what the proxy needs from a message."""

    __slots__ = ("body", "done", "headers", "keep_alive", "method", "parser", "status", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = 0

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_status(self, status: bytes) -> None:
        self.status = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.method = parser.get_method() if isinstance(parser, httptools.HttpRequestParser) \
            else parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done += 1


def httptools_runner(data: bytes, messages: int, request_side: bool) -> Callable[[int], None]:
    collector = _Collector()
    parser = (httptools.HttpRequestParser if request_side else httptools.HttpResponseParser)(collector)
    collector.parser = parser

    def run(n: int) -> None:
        feed = parser.feed_data
        for _ in range(n):
            feed(data)
    return run


def check(data: bytes, messages: int, request_side: bool) -> None:
    """Both parsers must see `messages` complete messages in one feed, or the numbers lie."""
    zm = RequestParser() if request_side else ResponseParser()
    for _ in range(messages):
        if isinstance(zm, ResponseParser):
            zm.request_sent(b"GET")
    zm.feed(data)
    ends = 0
    while (ev := zm.next_event()) is not NEED_DATA:
        ends += type(ev).__name__ == "EndOfMessage"
    assert ends == messages, (ends, messages)
    if httptools is not None:
        collector = _Collector()
        parser = (httptools.HttpRequestParser if request_side else httptools.HttpResponseParser)(collector)
        collector.parser = parser
        parser.feed_data(data)
        assert collector.done == messages


def calibrate(run: Callable[[int], None], seconds: float) -> int:
    """How many iterations of `run` take about `seconds` of CPU time."""
    n = 1
    while True:
        start = time.process_time()
        run(n)
        took = time.process_time() - start
        if took > seconds / 4:
            return max(1, int(n * seconds / took))
        n *= 4


def best_us(runs: list[Callable[[int], None]], per_call: int, seconds: float, rounds: int) -> list[float]:
    """Per-message CPU µs of each run: the best of `rounds` short slices, taken in turns so that
    every run sees the same machine (the minimum is the estimate least disturbed by neighbours)."""
    sizes = [calibrate(run, seconds) for run in runs]
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (run, n) in enumerate(zip(runs, sizes, strict=True)):
            start = time.process_time()
            run(n)
            best[i] = min(best[i], (time.process_time() - start) / (n * per_call))
    return [b * 1e6 for b in best]


def serializer_runs() -> list[tuple[str, Callable[[int], None]]]:
    headers = [(b"host", b"svc.ns.svc.cluster.local"), (b"user-agent", b"wrk/4.2"), (b"accept", b"*/*"),
               (b"x-request-id", b"3f2a9c1e-8d4b-4b7e-9c1a-2e5f6a7b8c9d"), (b"x-forwarded-for", b"10.0.0.7")]
    resp_headers = [(b"server", b"app"), (b"content-type", b"text/plain"), (b"content-length", b"13")]

    def req(n: int) -> None:
        for _ in range(n):
            request_head(b"GET", b"/plaintext", headers)

    def resp(n: int) -> None:
        for _ in range(n):
            response_head(200, resp_headers)

    def err(n: int) -> None:
        for _ in range(n):
            error_response(503)
    return [("request_head (5 fields)", req), ("response_head (3 fields)", resp),
            ("error_response(503), cached", err)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter slices (well under a minute)")
    args = parser.parse_args()
    seconds, rounds = (0.01, 40) if args.quick else (0.02, 100)

    rows = []
    for name, data, messages, request_side in WORKLOADS:
        check(data, messages, request_side)
        runs = [zmesh_runner(data, messages, request_side)]
        if httptools is not None:
            runs.append(httptools_runner(data, messages, request_side))
        zm, ht = [*best_us(runs, messages, seconds, rounds), None][:2]
        rows.append({"workload": name, "zmesh_us": round(zm, 3),
                     "httptools_us": None if ht is None else round(ht, 3),
                     "ratio": None if ht is None else round(zm / ht, 2)})
        print(f"  measured {name}", file=sys.stderr, flush=True)
    serial = [{"op": name, "us": round(best_us([run], 1, seconds, rounds)[0], 3)}
              for name, run in serializer_runs()]

    baseline = f"httptools {httptools.__version__}" if httptools is not None else "httptools (not installed)"
    print(f"\nParse cost per message, CPU µs, best of {rounds} slices (ratio = zmesh / {baseline})")
    print(f"{'workload':34s} {'zmesh µs':>10s} {'httptools µs':>13s} {'ratio':>7s} {'zmesh msg/s':>12s}")
    for row in rows:
        ht = "-" if row["httptools_us"] is None else f"{row['httptools_us']:.2f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{row['workload']:34s} {row['zmesh_us']:10.2f} {ht:>13s} {ratio:>7s} "
              f"{1e6 / row['zmesh_us']:12,.0f}")
    print(f"\n{'serializer':34s} {'µs':>10s}")
    for row in serial:
        print(f"{row['op']:34s} {row['us']:10.2f}")
    print(json.dumps({"benchmark": "http_codec", "quick": args.quick, "rounds": rounds,
                      "baseline": None if httptools is None else f"httptools {httptools.__version__}",
                      "parse": rows, "serialize": serial}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
