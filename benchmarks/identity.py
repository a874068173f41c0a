"""Issue 6's three identity numbers in one run, each against its baseline measured in the same run:

1. CSRs signed per second by citadel over the bus (CURVE RPC, client processes; one CSR per `sign`
   and 16 per `sign_batch`, as node agents send them) against raw
   `cryptography` ECDSA P-256 signing on the same core (identity_ca.py's measurements, reused).
2. TLS 1.3 handshakes per second on the sidecar's inbound STRICT port (`meshctl proxy --certs`, one
   worker, a TCP port to a local echo app), against a plain blocking Python `ssl` server using the
   same SSLContext settings (tls.WorkloadCerts). The client is a separate process: connect, mutual
   TLS handshake with a workload certificate, one byte echoed (so the server finished too), close.
   Also the server process's CPU per handshake, which does not depend on how fast the client is.
3. Keep-alive HTTP req/s through two sidecars (wrk -> client sidecar -> server sidecar -> nginx,
   one worker each; wrk -t1 -c32, 19-byte body) with Istio mTLS between them (ISTIO_MUTUAL cluster,
   STRICT inbound port) against the same two sidecars in plain text, interleaved in the same run.
   Goal (issue 6): mTLS costs at most 15% of the plain-text rate.

Certificates are issued by citadel's pki module and written as the node agent writes them. Progress
goes to stderr; stdout gets the table and, as its very last line, one JSON object. `--quick` finishes
in under a minute. Installs wrk and nginx with apt-get when missing (proxy_l4.py's helpers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from benchmarks import identity_ca  # noqa: E402
from benchmarks.proxy_l4 import (  # noqa: E402
    MESHCTL,
    Procs,
    Run,
    ensure_tools,
    free_port,
    start_nginx,
    wait_listening,
    wrk,
)
from benchmarks.proxy_l7 import client_config, server_config  # noqa: E402
from bus import keys  # noqa: E402

TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
GOAL_MTLS_COST = 0.15  # mTLS may cost at most this fraction of the plain-text req/s
GOAL_CERTS = 2000  # certificates per second, one core for citadel
BATCH = 16  # CSRs per sign_batch request


def log(msg: str) -> None:
    print(f"[identity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def issue_certs(tmp: Path) -> dict[str, Path]:
    """A root and one workload directory per identity, as the node agent writes them."""
    from controlplane.citadel import pki
    from nodeagent.certs import CertDir, CertSet

    root, root_key = pki.new_root(TD, time.time())
    ca = pki.SigningCa(root, root_key)
    out = {}
    for name, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        _, leaf = ca.issue(spki, spiffe, time.time() - 60, time.time() + 86400)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        CertDir(tmp / "certs", name, (os.getuid(), os.getgid())).write(
            CertSet(key_pem, [leaf], [pki.pem(root)]))
        out[name] = tmp / "certs" / name
    return out


# --- 1. CSRs ------------------------------------------------------------------------------------
def csr_rates(quick: bool, work: Path) -> dict[str, float]:
    cpus = sorted(os.sched_getaffinity(0))
    citadel_cpu, client_cpus = cpus[0], set(cpus[1:]) or {cpus[0]}
    keydir = work / "keys"
    opts = argparse.Namespace(duration=3.0 if quick else 10.0, warmup=1.0 if quick else 2.0, clients=2,
                              window=32, batch=1, profile=False)
    for name in ["citadel", *(f"bench-{i}" for i in range(opts.clients))]:
        keys.generate(keydir, name)
    csrs = identity_ca.make_csrs(32)
    log(f"CSRs: raw signing on cpu {citadel_cpu}, then citadel over the bus for {opts.duration:g} s")
    os.sched_setaffinity(0, {citadel_cpu})
    try:
        rows = identity_ca.baselines(csrs, 0.5 if quick else 2.0)
    finally:
        os.sched_setaffinity(0, set(cpus))
    single = identity_ca.measure_bus(opts, keydir, work, csrs, False, citadel_cpu, client_cpus)
    log(f"CSRs: the same, {BATCH} CSRs per sign_batch request (a node agent's renewals of one tick)")
    opts.batch, opts.window = BATCH, 4
    batched = identity_ca.measure_bus(opts, keydir, work, csrs, False, citadel_cpu, client_cpus)
    return {"raw_sign_per_s": rows["raw_sign"][0], "raw_sign_cpu_us": rows["raw_sign"][1],
            "in_process_per_s": rows["in_process"][0], "bus_per_s": single.rate, "bus_cpu_us": single.cpu_us,
            "batch_per_s": batched.rate, "batch_cpu_us": batched.cpu_us}


# --- 2. handshakes --------------------------------------------------------------------------------
def _client_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(certs / "root-cert.pem")
    ctx.load_cert_chain(certs / "cert-chain.pem", certs / "key.pem")
    return ctx


def handshake_client(port: int, certs: str, seconds: float, out: mp.Queue) -> None:
    """A separate process: full mutual-TLS handshakes, one after the other, for `seconds`."""
    ctx = _client_context(Path(certs))
    n, errors, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Finished, then the byte at once
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise ConnectionError("no echo")
            n += 1
        except OSError:
            errors += 1
    out.put((n / (time.perf_counter() - t0), errors))


def python_tls_server(certs: str, ready: mp.Queue) -> None:
    """The baseline: a blocking Python ssl server with the proxy's own server context, echoing a byte."""
    from dataplane.proxy.tls import WorkloadCerts

    wc = WorkloadCerts(certs)
    wc.load()
    ctx = wc.server
    lsock = socket.create_server(("127.0.0.1", 0), backlog=512)
    ready.put(lsock.getsockname()[1])
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the proxy's acceptor does
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(s.recv(1))
        except OSError:
            conn.close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def measure_handshakes(procs: Procs, tmp: Path, certs: dict[str, Path], seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    app = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    app_port = app.server_address[1]
    inbound = free_port()
    name = f"inbound|{app_port}||"
    config = {"version": "bench", "routes": {},
              "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [], "inbound": [
                  {"name": f"inbound_{app_port}", "port": app_port, "protocol": "TCP", "mtls_mode": "STRICT",
                   "cluster": name, "services": [{"service": "echo.default.svc.cluster.local",
                                                  "port": app_port}]}]},
              "clusters": {name: {"name": name, "direction": "inbound", "port": app_port, "type": "STATIC"}},
              "endpoints": {name: [{"address": "127.0.0.1", "port": app_port, "weight": 1, "locality": "",
                                    "healthy": True, "labels": {}, "service_account": "",
                                    "tls_mode": "disabled"}]}}
    proxy = start_sidecar(procs, tmp, config, "hs-server", certs["server"], inbound)
    baseline = ctx.Process(target=python_tls_server, args=(str(certs["server"]), out), daemon=True)
    baseline.start()
    baseline_port = out.get(timeout=30)
    results = {}
    try:
        for label, port, pid in (("python", baseline_port, baseline.pid), ("sidecar", inbound, proxy.pid)):
            log(f"handshakes: {label} server, client process for {seconds:g} s")
            server = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in server)
            client = ctx.Process(target=handshake_client, args=(port, str(certs["client"]), seconds, out))
            client.start()
            rate, errors = out.get(timeout=seconds + 60)
            client.join(10)
            cpu = sum(sum(p.cpu_times()[:2]) for p in server) - cpu0
            results[label] = {"per_s": rate, "errors": errors,
                              "server_cpu_us": cpu / max(rate * seconds, 1) * 1e6}
    finally:
        baseline.terminate()
        baseline.join(5)
        app.shutdown()
        app.server_close()
    return results


# --- 3. req/s through two sidecars ----------------------------------------------------------------
def start_sidecar(procs: Procs, tmp: Path, config: dict[str, Any], label: str, certs: Path | None,
                  listen_port: int) -> Any:
    """`meshctl proxy --mode explicit`, one worker; `listen_port` is its inbound port (server) or the
    outbound service port of its config (client)."""
    path = tmp / f"{label}.json"
    path.write_text(json.dumps(config))
    inbound = listen_port if not config["listeners"]["outbound"] else free_port()
    args = [str(MESHCTL), "proxy", "--id", f"bench-{label}", "--labels", f"app={label}",
            "--config", str(path), "--mode", "explicit", "--workers", "1", "--inbound-port", str(inbound),
            "--admin-port", str(free_port()), "--stats-port", str(free_port()), "--no-access-log"]
    if certs is not None:
        args += ["--certs", str(certs)]
    proc = procs.start(args, tmp / f"{label}.out")
    wait_listening(listen_port, proc)
    return proc


def two_hop(procs: Procs, tmp: Path, certs: dict[str, Path], backend: int, mtls: bool) -> tuple[int, list]:
    server_cfg, _ = server_config(backend)
    if mtls:
        server_cfg["listeners"]["inbound"][0]["mtls_mode"] = "STRICT"
    server_port, client_port = free_port(), free_port()
    client_cfg = client_config(server_port, client_port)
    if mtls:
        for cluster in client_cfg["clusters"].values():
            cluster["tls"] = {"mode": "ISTIO_MUTUAL", "subject_alt_names": [SERVER_ID]}
    tag = "mtls" if mtls else "plain"
    server = start_sidecar(procs, tmp, server_cfg, f"{tag}-server", certs["server"] if mtls else None,
                           server_port)
    client = start_sidecar(procs, tmp, client_cfg, f"{tag}-client", certs["client"] if mtls else None,
                           client_port)
    return client_port, [client, server]


def measure_two_hop(procs: Procs, tmp: Path, certs: dict[str, Path], seconds: float,
                    rounds: int) -> dict[str, Run]:
    backend = start_nginx(procs, tmp)
    targets = {"plain": two_hop(procs, tmp, certs, backend, False),
               "mtls": two_hop(procs, tmp, certs, backend, True)}
    samples: dict[str, list[Run]] = {k: [] for k in targets}
    for i in range(rounds):
        for label, (port, proxies) in targets.items():
            wrk(port, "/small", 1, [], Run(label, "19B"))  # connections and handshakes made here
            run = Run(label, "19B")
            log(f"two sidecars, round {i + 1}/{rounds}, {label}: wrk -t1 -c32 -d{seconds:g}s")
            wrk(port, "/small", seconds, proxies, run)
            samples[label].append(run)
    return {k: sorted(v, key=lambda r: r.rps)[len(v) // 2] for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one round (under a minute)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved wrk rounds (median shown)")
    opts = ap.parse_args()
    seconds = 2.0 if opts.quick else 5.0
    rounds = 1 if opts.quick else opts.rounds
    ensure_tools()
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-bench-identity-"))
    try:
        certs = issue_certs(tmp)
        csr = csr_rates(opts.quick, tmp)
        hs = measure_handshakes(procs, tmp, certs, 3.0 if opts.quick else 8.0)
        hop = measure_two_hop(procs, tmp, certs, seconds, rounds)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    cost = 1 - hop["mtls"].rps / hop["plain"].rps if hop["plain"].rps else None
    rows = [
        ("CSRs/s: citadel, one per request", csr["bus_per_s"], csr["bus_cpu_us"],
         "raw ECDSA P-256 sign", csr["raw_sign_per_s"], csr["raw_sign_cpu_us"]),
        (f"CSRs/s: citadel, sign_batch of {BATCH}", csr["batch_per_s"], csr["batch_cpu_us"],
         "raw ECDSA P-256 sign", csr["raw_sign_per_s"], csr["raw_sign_cpu_us"]),
        ("handshakes/s: sidecar STRICT port", hs["sidecar"]["per_s"], hs["sidecar"]["server_cpu_us"],
         "Python ssl server", hs["python"]["per_s"], hs["python"]["server_cpu_us"]),
        ("req/s: two sidecars, mTLS", hop["mtls"].rps, hop["mtls"].cpu_us_per_req,
         "two sidecars, plain text", hop["plain"].rps, hop["plain"].cpu_us_per_req),
    ]
    print(f"{'measured':<36} {'per s':>9} {'CPU us':>8}   {'baseline':<26} {'per s':>9} {'CPU us':>8} "
          f"{'ratio':>6}")
    print("-" * 110)
    for name, rate, us, bname, brate, bus in rows:
        print(f"{name:<36} {rate:>9,.0f} {us or 0:>8.1f}   {bname:<26} {brate:>9,.0f} {bus or 0:>8.1f} "
              f"{rate / brate if brate else 0:>6.2f}")
    print("(CPU us: per operation, of the serving process(es) only; for the two sidecars, both of them)")
    per_core = 1e6 / csr["batch_cpu_us"] if csr["batch_cpu_us"] else 0
    print(f"certificates per citadel core (from its CPU per certificate, batched): {per_core:,.0f}/s "
          f"(goal >= {GOAL_CERTS:,}: {'MET' if per_core >= GOAL_CERTS else 'NOT MET'})")
    met = cost is not None and cost <= GOAL_MTLS_COST and not hop["mtls"].errors
    print(f"mTLS cost on keep-alive req/s: {cost:.1%} (goal <= {GOAL_MTLS_COST:.0%}: "
          f"{'MET' if met else 'NOT MET'}); wrk errors plain {hop['plain'].errors}, "
          f"mTLS {hop['mtls'].errors}; "
          f"handshake errors {hs['sidecar']['errors']}")
    print(json.dumps({
        "benchmark": "identity", "quick": opts.quick, "rounds": rounds, "seconds": seconds,
        "csr_bus_per_s": round(csr["bus_per_s"]), "csr_raw_sign_per_s": round(csr["raw_sign_per_s"]),
        "csr_bus_cpu_us": round(csr["bus_cpu_us"], 1), "csr_batch": BATCH,
        "csr_batch_per_s": round(csr["batch_per_s"]), "csr_batch_cpu_us": round(csr["batch_cpu_us"], 1),
        "certs_per_citadel_core": round(per_core), "goal_certs_per_s": GOAL_CERTS,
        "handshakes_per_s": round(hs["sidecar"]["per_s"]),
        "handshake_server_cpu_us": round(hs["sidecar"]["server_cpu_us"], 1),
        "handshakes_python_per_s": round(hs["python"]["per_s"]),
        "handshake_python_cpu_us": round(hs["python"]["server_cpu_us"], 1),
        "two_hop_plain_rps": round(hop["plain"].rps), "two_hop_mtls_rps": round(hop["mtls"].rps),
        "two_hop_plain_cpu_us": hop["plain"].cpu_us_per_req,
        "two_hop_mtls_cpu_us": hop["mtls"].cpu_us_per_req,
        "mtls_cost": round(cost, 4) if cost is not None else None, "goal_mtls_cost": GOAL_MTLS_COST,
        "met": met}))


if __name__ == "__main__":
    main()
