"""Identity CA throughput: workload CSRs signed per second over the bus, against the raw rates of
the `cryptography` operations that signing is made of, measured in the same run on the same core.

Citadel runs in its own process pinned to one core, as `meshctl citadel` runs it (CURVE RPC
server, signed publisher, audit lines to a log file, issuance tracking) but with a static node
authorizer, so pilot is not part of the measurement. Client processes, pinned to the other
cores, each keep `--window` requests in flight (AsyncRpcClient over CURVE, one node key per
process), drawing CSRs from a pool made beforehand: key generation is the node agent's cost.

Rows (rate per second of wall time, and CPU microseconds per operation):
- raw ECDSA P-256 sign / verify: what one leaf signature and one CSR check cost at least
- cryptography CertificateBuilder leaf: the straightforward way to issue (not what citadel does)
- citadel in-process: CertificateAuthority.sign on this core, no bus (audit lines to /dev/null)
- bus echo: the same RPC with replies of a certificate's size and no CA work, in the same setup
- citadel over the bus: the real service; its CPU per certificate (all its threads, ZeroMQ's
  I/O thread included) gives the capacity of a dedicated core when this machine is shared

Prints the table, then one JSON line. `--quick` measures 5 s per bus run (about 30 s in all);
`--profile` adds cProfile's top functions of citadel's loop thread.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import multiprocessing as mp
import os
import pstats
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from bus import keys  # noqa: E402

TD = "cluster.local"
ACCOUNTS = [("default", f"sa-{i}") for i in range(8)]
GOAL = 2000
LABELS = {"raw_sign": "raw ECDSA P-256 sign", "raw_verify": "raw ECDSA P-256 verify",
          "builder_leaf": "cryptography CertificateBuilder leaf", "in_process": "citadel in-process (no bus)",
          "bus_echo": "bus echo, same sizes, no CA (CURVE RPC)", "bus": "citadel over the bus (CURVE RPC)"}


def log(msg: str) -> None:
    print(f"[identity_ca {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_csrs(n: int) -> list[str]:
    out = []
    for i in range(n):
        ns, sa = ACCOUNTS[i % len(ACCOUNTS)]
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/{ns}/sa/{sa}")])
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(san, critical=False).sign(key, hashes.SHA256()))
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


def cpu_rate(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(operations per wall second, CPU microseconds per operation) of `fn` run for `seconds`."""
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        for _ in range(50):
            fn()
        n += 50
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return n / wall, cpu / n * 1e6


def baselines(csrs: list[str], seconds: float) -> dict[str, tuple[float, float]]:
    """The raw operations, on the core citadel will use."""
    from bus import logs
    from controlplane.citadel.authz import StaticAuthorizer
    from controlplane.citadel.ca import CertificateAuthority
    from controlplane.citadel.pki import SigningCa, new_root

    now = time.time()
    root, root_key = new_root(TD, now)
    tbs = b"\x30" * 420  # a leaf's TBSCertificate is about this long
    sig = root_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    pub = root_key.public_key()
    csr = x509.load_pem_x509_csr(csrs[0].encode())
    leaf_key, uri = csr.public_key(), f"spiffe://{TD}/ns/default/sa/sa-0"
    start = datetime.datetime.now(datetime.UTC)

    def builder_leaf() -> None:
        (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root.subject).public_key(leaf_key)
         .serial_number(x509.random_serial_number()).not_valid_before(start)
         .not_valid_after(start + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                        critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
         .sign(root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    with contextlib.redirect_stderr(open(os.devnull, "w")):  # the log handler keeps this file
        logs.configure()  # audit lines cost CPU too: this process writes them where nobody reads
    ca = CertificateAuthority(SigningCa(root, root_key), StaticAuthorizer({"bench": ACCOUNTS}))
    bodies = [{"csr": c} for c in csrs]
    i = [0]

    def inprocess() -> None:
        i[0] += 1
        ca.sign("bench", bodies[i[0] % len(bodies)], now)

    return {
        "raw_sign": cpu_rate(lambda: root_key.sign(tbs, ec.ECDSA(hashes.SHA256())), seconds),
        "raw_verify": cpu_rate(lambda: pub.verify(sig, tbs, ec.ECDSA(hashes.SHA256())), seconds),
        "builder_leaf": cpu_rate(builder_leaf, seconds),
        "in_process": cpu_rate(inprocess, seconds),
    }


def run_citadel(keydir: str, cpu: int, endpoint: str, nodes: list[str], echo: bool, logfile: str,
                profile: str | None, out: mp.Queue, stop: mp.Event) -> None:
    """Citadel's process: pinned to `cpu`, its loop in the main thread (so cProfile sees it).
    `echo`: the bus alone, answering every request with one canned reply of a real reply's size."""
    os.sched_setaffinity(0, {cpu})
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    from bus import logs
    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.pubsub import Publisher
    from bus.rpc import RpcServer
    from bus.signing import Signer
    from controlplane.citadel.authz import StaticAuthorizer
    from controlplane.citadel.ca import CertificateAuthority
    from controlplane.citadel.pki import SigningCa, new_root
    from controlplane.citadel.service import Citadel, serve_rpc

    logs.configure()
    ring = Keyring(keydir, "citadel")
    loop = Loop("citadel")
    root, key = new_root(TD, time.time())
    ca = CertificateAuthority(SigningCa(root, key), StaticAuthorizer({n: ACCOUNTS for n in nodes}))
    if echo:
        canned = ca.sign(nodes[0], {"csr": make_csrs(1)[0]}, time.time()).reply()
        handlers = {"sign": lambda req: canned,
                    "sign_batch": lambda req: {"results": [canned] * len(req.body["requests"])}}
        RpcServer(loop, endpoint, ring, handlers, name="echo")
    else:
        pub = Publisher(loop, pub_endpoint="tcp://127.0.0.1:*", snapshot_endpoint="tcp://127.0.0.1:*",
                        keyring=ring, signer=Signer("citadel", ring.signing_key()), name="citadel")
        serve_rpc(loop, Citadel(loop, ca, pub), endpoint, ring)
    threading.Thread(target=lambda: (stop.wait(), loop.stop()), daemon=True).start()
    out.put(("ready", os.getpid()))
    if profile:
        cProfile.runctx("loop.run()", {}, {"loop": loop}, profile)
    else:
        loop.run()


def run_client(index: int, cpus: set[int], keydir: str, endpoint: str, csrs: list[str], window: int,
               batch: int, warmup: float, duration: float, out: mp.Queue, go: mp.Event) -> None:
    """One node agent process: `window` requests in flight, each `sign` (batch 1) or `sign_batch` of
    `batch` CSRs, as the node agent sends every CSR due in one tick; counts certificates issued."""
    os.sched_setaffinity(0, cpus)
    from bus import logs
    from bus.keys import Keyring
    from bus.loop import Loop
    from bus.rpc import AsyncRpcClient

    logs.configure("WARNING")
    name = f"bench-{index}"
    loop = Loop(name).start()
    client = loop.call_sync(lambda: AsyncRpcClient(loop, endpoint, Keyring(keydir, name), "citadel",
                                                   origin=name, timeout=5.0, retries=2))
    client.call_wait("sign", {"csr": csrs[0]}, timeout=20)  # connected (requests before that are dropped)
    counts = {"ok": 0, "refused": 0, "error": 0}
    sent = [0]
    running = [True]

    def send() -> None:
        sent[0] += 1
        if batch == 1:
            client.call("sign", {"csr": csrs[sent[0] % len(csrs)]}, done)
        else:
            first = sent[0] * batch
            client.call("sign_batch", {"requests": [{"csr": csrs[(first + i) % len(csrs)]}
                                                    for i in range(batch)]}, done)

    def done(reply: Any, error: Exception | None) -> None:
        if error:
            counts["error"] += batch
        else:
            for one in reply["results"] if batch > 1 else [reply]:
                counts["refused" if "refused" in one else "ok"] += 1
        if running[0]:
            send()

    out.put(("client-ready", index))
    go.wait(60)
    loop.call_sync(lambda: [send() for _ in range(window)])
    time.sleep(warmup)
    first, t0 = loop.call_sync(lambda: counts["ok"]), time.perf_counter()
    time.sleep(duration)
    last, t1 = loop.call_sync(lambda: counts["ok"]), time.perf_counter()
    running[0] = False
    time.sleep(0.5)
    loop.call_sync(client.close)
    loop.stop()
    out.put(("client-done", index, (last - first) / (t1 - t0), dict(counts)))


@dataclass
class BusRun:
    rate: float       # replies per second, all clients
    cpu_us: float     # the server process's CPU per reply (all its threads: loop, ZeroMQ I/O, ZAP)
    busy: float       # fraction of its core the server process used
    counts: dict[str, int]


def measure_bus(opts: argparse.Namespace, keydir: Path, work: Path, csrs: list[str], echo: bool,
                citadel_cpu: int, client_cpus: set[int]) -> BusRun:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    nodes = [f"bench-{i}" for i in range(opts.clients)]
    with socket.socket() as probe:  # a port nobody holds now (ZeroMQ binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    profile = str(work / "citadel.prof") if opts.profile and not echo else None
    procs = [ctx.Process(target=run_citadel, args=(str(keydir), citadel_cpu, endpoint, nodes, echo,
                                                   str(work / "citadel.log"), profile, out, stop))]
    procs[0].start()
    try:
        kind, pid = out.get(timeout=60)
        assert kind == "ready", kind
        for i in range(opts.clients):
            args = (i, client_cpus, str(keydir), endpoint, csrs, opts.window, opts.batch, opts.warmup,
                    opts.duration, out, go)
            procs.append(ctx.Process(target=run_client, args=args))
            procs[-1].start()
        for _ in range(opts.clients):
            msg = out.get(timeout=60)
            assert msg[0] == "client-ready", msg
        server = psutil.Process(pid)
        go.set()
        time.sleep(opts.warmup)
        cpu0, wall0 = sum(server.cpu_times()[:2]), time.perf_counter()
        time.sleep(opts.duration)
        cpu1, wall1 = sum(server.cpu_times()[:2]), time.perf_counter()
        rates, counts = [], {"ok": 0, "refused": 0, "error": 0}
        for _ in range(opts.clients):
            msg = out.get(timeout=opts.duration + 60)
            assert msg[0] == "client-done", msg
            rates.append(msg[2])
            for k, v in msg[3].items():
                counts[k] += v
        alive = procs[0].is_alive()
    finally:
        stop.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.terminate()
    rate = sum(rates)
    if not alive or rate <= 0:
        tail = (work / "citadel.log").read_text()[-3000:]
        what = "died" if not alive else f"answered nothing (it used {cpu1 - cpu0:.2f} s of CPU)"
        raise RuntimeError(f"the {'echo' if echo else 'citadel'} server {what}; replies {counts}; "
                           f"its log ends:\n{tail}")
    return BusRun(rate, (cpu1 - cpu0) / max(1.0, rate * (wall1 - wall0)) * 1e6,
                  (cpu1 - cpu0) / (wall1 - wall0), counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s measurements (under a minute in all)")
    parser.add_argument("--duration", type=float, help="seconds measured over the bus (default 20, quick 5)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--window", type=int, default=32, help="requests in flight per client")
    parser.add_argument("--batch", type=int, default=1,
                        help="CSRs per request: 1 sends `sign`, more send `sign_batch` (as node agents do)")
    parser.add_argument("--profile", action="store_true", help="cProfile citadel's process; print the top")
    opts = parser.parse_args()
    opts.duration = opts.duration or (5.0 if opts.quick else 20.0)
    opts.warmup = 1.0 if opts.quick else 3.0
    cpus = sorted(os.sched_getaffinity(0))
    citadel_cpu = cpus[0]
    client_cpus = set(cpus[1:]) or {citadel_cpu}
    work = Path(tempfile.mkdtemp(prefix="zmesh-bench-ca-"))
    try:
        keydir = work / "keys"
        for name in ["citadel", *(f"bench-{i}" for i in range(opts.clients))]:
            keys.generate(keydir, name)
        csrs = make_csrs(64)
        log(f"baselines on cpu {citadel_cpu}")
        os.sched_setaffinity(0, {citadel_cpu})
        rows = baselines(csrs, 1.0 if opts.quick else 3.0)
        os.sched_setaffinity(0, set(cpus))
        log(f"server on cpu {citadel_cpu}; {opts.clients} client process(es) on cpus {sorted(client_cpus)}, "
            f"{opts.window} requests of {opts.batch} CSR(s) in flight each; {opts.duration:.0f} s after "
            f"{opts.warmup:.0f} s warm-up")
        echo = measure_bus(opts, keydir, work, csrs, True, citadel_cpu, client_cpus)
        rows["bus_echo"] = (echo.rate, echo.cpu_us)
        bus = measure_bus(opts, keydir, work, csrs, False, citadel_cpu, client_cpus)
        rows["bus"] = (bus.rate, bus.cpu_us)
        report(opts, rows, bus, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(opts: argparse.Namespace, rows: dict[str, tuple[float, float]], bus: BusRun, work: Path) -> None:
    print(f"{'operation':<44} {'per s (wall)':>13} {'CPU us each':>12} {'per s per core':>15}")
    print("-" * 87)
    for name, (rate, us) in rows.items():
        print(f"{LABELS[name]:<44} {rate:>13,.0f} {us:>12.1f} {1e6 / us:>15,.0f}")
    print(f"\ncitadel's process used {bus.busy:.0%} of its core; replies: {bus.counts['ok']} issued, "
          f"{bus.counts['refused']} refused, {bus.counts['error']} errors")
    inproc, sign, verify, echo = (rows[k][1] for k in ("in_process", "raw_sign", "raw_verify", "bus_echo"))
    print(f"per certificate (CPU): CSR verify {verify:.0f} us + leaf signature {sign:.0f} us + the rest of "
          f"the CA {inproc - verify - sign:.0f} us (parsing, checks, DER, audit line, tracking) + the bus "
          f"and the shell {bus.cpu_us - inproc:.0f} us (an echo of the same sizes costs {echo:.0f} us)")
    capacity = 1e6 / bus.cpu_us
    print(f"goal >= {GOAL} certs/s: {'MET' if bus.rate >= GOAL else 'NOT MET'} on this machine "
          f"({bus.rate:,.0f}/s wall; {capacity:,.0f}/s from the CPU per certificate)")
    if opts.profile:
        text = io.StringIO()
        pstats.Stats(str(work / "citadel.prof"), stream=text).sort_stats("tottime").print_stats(20)
        print(text.getvalue())
    print(json.dumps({"benchmark": "identity_ca", "quick": opts.quick, "clients": opts.clients,
                      "window": opts.window, "batch": opts.batch, "certs_per_s": round(bus.rate),
                      "citadel_cpu_us_per_cert": round(bus.cpu_us, 1),
                      "citadel_core_busy": round(bus.busy, 3),
                      "certs_per_s_per_core": round(capacity),
                      **{f"{k}_cpu_us": round(us, 1) for k, (_, us) in rows.items()},
                      "goal_certs_per_s": GOAL, "met": bus.rate >= GOAL}))


if __name__ == "__main__":
    main()
