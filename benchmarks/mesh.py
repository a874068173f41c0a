"""What interception costs: connect() latency under Istio's rules and the NFQUEUE decider, and
requests through two sidecars, each against its baseline in the same run.

Two network namespaces made here, joined by a veth pair: `a` (10.78.0.1, the client pod) and `b`
(10.78.0.2 and 10.78.0.3, the server pod). Nothing leaves them.

connect(): N sequential connects (p50/p99 of the connect() call) from `a`, and new connections/s
from 2 client processes, with:

* none:          no rules; straight to b's acceptor
* nat:           `meshctl iptables` (nat only): redirected to a local acceptor on 15001
* nfq-floor:     `--nfqueue` with a bare NetfilterQueue reader that accepts every packet unread: what
                 the queue round trip itself costs, whatever the decider does
* nfq-queued:    the decider with `--no-fast-path`, a known destination: every SYN queued, decided in
                 Python, marked, redirected to 15001
* nfq-redirect:  the decider (its kernel fast path, ISTIO_KNOWN), a known destination: marked in the
                 kernel, redirected to 15001
* nfq-pass:      the same, an unknown destination under ALLOW_ANY: marked PASS, goes direct

The decider adds (nfq-redirect - nat) and (nfq-pass - none); goal <= 50 µs at p50. Its CPU per SYN
comes from its process' CPU time over the sequential run (system time included: the verdict's
syscall carries the packet on through the stack, so part of that is the connection's own path).

end to end: wrk -t1 -c32 (keep-alive HTTP/1.1) from `a` to nginx in `b` through two zmesh sidecars
in transparent mode (`meshctl iptables` in both pods, one worker each, a static config file, the
service declared TCP), against the same nginx on a port both rule sets exclude (direct).

Needs root, iproute2, iptables, NetfilterQueue (for the decider rows), wrk and nginx (installed with
apt-get when missing). stdout: the tables, then one JSON line. `--quick` finishes in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.proxy_l4 import Procs, Run, ensure_tools, fmt, median, nginx_conf, parse_wrk  # noqa: E402

A_IP, B_IP, B_OTHER = "10.78.0.1", "10.78.0.2", "10.78.0.3"
SERVER_PORT, MESH_PORT, DIRECT_PORT = 8000, 8080, 8081
QUEUE = 3
BASELINE = {"nat": "none", "nfq-floor": "none", "nfq-queued": "nat", "nfq-redirect": "nat",
            "nfq-pass": "none"}  # what each row adds to
# NetfilterQueue's own floor: accept every packet unread and unmarked (so it goes direct, like nfq-pass)
FLOOR = ("from netfilterqueue import NetfilterQueue as Q\nq = Q()\n"
         f"q.bind({QUEUE}, lambda p: p.accept(), max_len=4096, range=128)\n"
         "print('decider ready', flush=True)\nq.run()")
GOAL_ADDED_P50_US = 50.0
PROXY_GID = "1337"


def log(msg: str) -> None:
    print(f"[mesh {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the programs run inside the namespaces (`python benchmarks/mesh.py _accept|_connect ...`) --------

def _accept(port: int) -> None:
    """Accept and close, forever (the far end of a connect(); also the stand-in for 15001)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.close()


def _connect(host: str, port: int, count: int, seconds: float) -> None:
    """`count` sequential connects (latencies in µs), or as many as fit in `seconds` (a rate)."""
    linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")  # close with RST: no TIME_WAIT pile
    lat: list[float] = []
    done = 0
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while (done < count) if count else (clock() < end):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        t0 = clock()
        s.connect((host, port))
        if count:
            lat.append((clock() - t0) * 1e6)
        s.close()
        done += 1
    lat.sort()
    out: dict[str, Any] = {"connections": done, "seconds": clock() - start}
    if lat:
        out.update(p50_us=lat[len(lat) // 2], p99_us=lat[int(len(lat) * 0.99)])
    print(json.dumps(out), flush=True)


# -- the benchmark ------------------------------------------------------------------------------------

def run(*args: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


class Pods(Procs):
    """The two namespaces and every process started in them (stopped by process group)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        tag = secrets.token_hex(3)
        self.a, self.b = f"zm-bench-{tag}-a", f"zm-bench-{tag}-b"
        self.tmp = tmp
        self.made: list[str] = []

    def up(self) -> None:
        for ns in (self.a, self.b):
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.a, "link", "add", "zb0", "type", "veth", "peer", "name", "zb1", "netns", self.b)
        for ns, dev, addrs in ((self.a, "zb0", [A_IP]), (self.b, "zb1", [B_IP, B_OTHER])):
            for addr in addrs:
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def exec(self, ns: str, *args: str, proxy: bool = False) -> list[str]:
        """`args` in namespace `ns`; `proxy`: in group 1337, which the rules exempt (uid stays root:
        the venv may live under root's home)."""
        as_proxy = ["setpriv", f"--regid={PROXY_GID}", "--clear-groups"] if proxy else []
        return ["ip", "netns", "exec", ns, *as_proxy, *args]

    def start_in(self, name: str, ns: str, args: list[str], ready: str | None = None, *,
              proxy: bool = False, timeout: float = 15) -> subprocess.Popen:
        out = self.tmp / f"{name}.log"
        with out.open("wb") as f:
            proc = subprocess.Popen(self.exec(ns, *args, proxy=proxy), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while ready is not None and ready not in out.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {out.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return proc

    def down(self) -> None:
        self.stop_all()
        for ns in self.made:
            run("ip", "netns", "del", ns, check=False)

    def iptables(self, ns: str, *flags: str) -> None:
        run(*self.exec(ns, sys.executable, "-m", "dataplane.init", "iptables", "--no-ipv6", *flags))

    def python(self, ns: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        done = run(*self.exec(ns, sys.executable, str(Path(__file__).resolve()), *args), timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Connect:
    config: str
    p50_us: float = 0.0
    p99_us: float = 0.0
    conn_per_s: float | None = None
    decider_cpu_us_per_syn: float | None = None
    added_p50_us: float | None = None


def decider_config(path: Path) -> None:
    """The decider's view of the mesh: one service, VIP B_IP; B_OTHER is outside it."""
    path.write_text(json.dumps({"version": "bench", "listeners": {"outbound_traffic_policy": "ALLOW_ANY",
                                "outbound": [{"name": f"svc_{SERVER_PORT}", "addresses": [B_IP],
                                              "port": SERVER_PORT, "protocol": "TCP"}]}}))


def wait_fast_path(pods: Pods) -> None:
    """Until the decider has written ISTIO_KNOWN (it reads its config after "decider ready")."""
    deadline = time.monotonic() + 10
    while "-A ISTIO_KNOWN" not in run(*pods.exec(pods.a, "iptables-save", "-t", "mangle")).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError("the decider did not write its fast path")
        time.sleep(0.05)


def cpu_seconds(proc: subprocess.Popen) -> float:
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def bench_connect(pods: Pods, count: int, rate_seconds: float, have_nfq: bool, rounds: int) -> list[Connect]:
    """Every scenario once per round, in order (the box's load drifts; rows show medians over rounds)."""
    me = [sys.executable, str(Path(__file__).resolve()), "_accept"]
    acceptors = [pods.start_in("accept-b", pods.b, [*me, str(SERVER_PORT)], "ready"),
                 pods.start_in("accept-15001", pods.a, [*me, "15001"], "ready")]
    base = ("-p", "15001", "-u", PROXY_GID, "-b", "")  # outbound only: the client pod
    scenarios: list[tuple[str, tuple[str, ...], str]] = [("none", (), B_IP), ("nat", base, B_IP)]
    if have_nfq:
        scenarios += [("nfq-floor", (*base, "--nfqueue", str(QUEUE)), B_OTHER),
                      ("nfq-queued", (*base, "--nfqueue", str(QUEUE)), B_IP),
                      ("nfq-redirect", (*base, "--nfqueue", str(QUEUE)), B_IP),
                      ("nfq-pass", (*base, "--nfqueue", str(QUEUE)), B_OTHER)]
    config = pods.tmp / "decider.json"
    decider_config(config)
    decider = None
    wanted = ""  # the decider variant running
    samples: dict[str, list[Connect]] = {name: [] for name, _, _ in scenarios}
    for i in range(rounds):
        for name, flags, host in scenarios:
            pods.iptables(pods.a, "--cleanup")
            if flags:
                pods.iptables(pods.a, *flags)
            variant = "nfq-redirect" if name == "nfq-pass" else name  # the same decider serves both
            if variant != wanted and decider is not None:
                pods.stop(decider)
                decider, wanted = None, ""
            if name.startswith("nfq") and decider is None:
                wanted = variant
                args = [sys.executable, "-c", FLOOR] if name == "nfq-floor" else [
                    sys.executable, "-m", "dataplane.init", "decider", "--queue", str(QUEUE),
                    "--config", str(config), *(["--no-fast-path"] if name == "nfq-queued" else [])]
                decider = pods.start_in(name, pods.a, args, "decider ready")
            pods.python(pods.a, "_connect", host, str(SERVER_PORT), "200", "0")  # warm-up
            if wanted == "nfq-redirect":
                wait_fast_path(pods)  # re-installed rules start empty: the decider writes it again
            cpu0 = cpu_seconds(decider) if decider else 0.0
            log(f"round {i + 1}/{rounds} connect: {name}, {count} sequential connects to {host}")
            seq = pods.python(pods.a, "_connect", host, str(SERVER_PORT), str(count), "0")
            row = Connect(name, seq["p50_us"], seq["p99_us"])
            if decider is not None:
                row.decider_cpu_us_per_syn = (cpu_seconds(decider) - cpu0) * 1e6 / seq["connections"]
            if rate_seconds and name in ("none", "nat", "nfq-queued", "nfq-redirect"):
                log(f"round {i + 1}/{rounds} connect: {name}, new connections/s from 2 clients")
                args = [sys.executable, str(Path(__file__).resolve()), "_connect", host, str(SERVER_PORT),
                        "0", str(rate_seconds)]
                clients = [subprocess.Popen(pods.exec(pods.a, *args), stdout=subprocess.PIPE, text=True,
                                            cwd=ROOT) for _ in range(2)]
                outs = [json.loads(c.communicate(timeout=rate_seconds + 60)[0].strip().splitlines()[-1])
                        for c in clients]
                row.conn_per_s = sum(o["connections"] / o["seconds"] for o in outs)
            samples[name].append(row)
    pods.iptables(pods.a, "--cleanup")
    for proc in [*acceptors, *([decider] if decider else [])]:
        pods.stop(proc)
    results = [Connect(name, median([r.p50_us for r in rows]) or 0.0, median([r.p99_us for r in rows]) or 0.0,
                       median([r.conn_per_s for r in rows]), median([r.decider_cpu_us_per_syn for r in rows]))
               for name, rows in samples.items()]
    by = {r.config: r for r in results}
    for row in results:
        if row.config in BASELINE:
            row.added_p50_us = row.p50_us - by[BASELINE[row.config]].p50_us
    return results


def mesh_configs(tmp: Path) -> tuple[Path, Path]:
    """Static proxy configs (pilot's schema): a's outbound to the service, b's inbound to nginx."""
    svc = "web.default.svc.cluster.local"
    out_cluster, in_cluster = f"outbound|{MESH_PORT}||{svc}", f"inbound|{MESH_PORT}||"

    def endpoint(address: str) -> dict[str, Any]:
        return {"address": address, "port": MESH_PORT, "weight": 1, "locality": "", "healthy": True,
                "labels": {}, "service_account": "", "tls_mode": "disabled"}

    security = {"mtls": {"mode": "DISABLE", "ports": {}}, "authorization": []}
    a = {"version": "a1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "inbound": [], "outbound": [
        {"name": f"{svc}_{MESH_PORT}", "service": svc, "addresses": [B_IP], "port": MESH_PORT,
         "protocol": "TCP",
         "tcp_routes": [{"match": {}, "clusters": [{"name": out_cluster, "weight": 100}]}]}]},
         "routes": {}, "clusters": {out_cluster: {"name": out_cluster, "direction": "outbound", "type": "EDS",
                                                  "service": svc, "port": MESH_PORT}},
         "endpoints": {out_cluster: [endpoint(B_IP)]}, "security": security}
    b = {"version": "b1", "listeners": {"outbound_traffic_policy": "ALLOW_ANY", "outbound": [], "inbound": [
        {"name": f"inbound_{MESH_PORT}", "port": MESH_PORT, "protocol": "TCP", "mtls_mode": "DISABLE",
         "cluster": in_cluster, "services": [{"service": svc, "port": MESH_PORT}]}]},
         "routes": {}, "clusters": {in_cluster: {"name": in_cluster, "direction": "inbound", "type": "STATIC",
                                                 "port": MESH_PORT}},
         "endpoints": {in_cluster: [endpoint("127.0.0.1")]}, "security": security}
    paths = (tmp / "proxy-a.json", tmp / "proxy-b.json")
    for path, config in zip(paths, (a, b), strict=True):
        path.write_text(json.dumps(config))
    return paths


def start_nginx(pods: Pods) -> None:
    tmp = pods.tmp
    conf = nginx_conf(tmp, [str(MESH_PORT), str(DIRECT_PORT)])
    pods.start_in("nginx", pods.b, ["nginx", "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    deadline = time.monotonic() + 10
    while run(*pods.exec(pods.b, "ss", "-ltn", f"sport = :{MESH_PORT}")).stdout.count("LISTEN") == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("nginx did not listen")
        time.sleep(0.05)


def bench_e2e(pods: Pods, seconds: float, rounds: int) -> list[Run]:
    start_nginx(pods)
    cfg_a, cfg_b = mesh_configs(pods.tmp)
    proxies = []
    for ns, cfg, name in ((pods.a, cfg_a, "proxy-a"), (pods.b, cfg_b, "proxy-b")):
        # the direct baseline's port is excluded both ways, so it runs beside the mesh
        pods.iptables(ns, "-u", PROXY_GID, "-o", str(DIRECT_PORT), "-d", str(DIRECT_PORT))
        args = [sys.executable, "-m", "meshctl", "proxy", "--id", name, "--config", str(cfg),
                "--mode", "transparent", "--workers", "1", "--no-access-log"]
        proxies.append(pods.start_in(name, ns, args, "config applied", proxy=True))
    samples: dict[str, list[Run]] = {"direct": [], "mesh": []}
    for i in range(rounds):
        for config, port in (("direct", DIRECT_PORT), ("mesh", MESH_PORT)):
            log(f"e2e round {i + 1}/{rounds} {config}: wrk -t1 -c32 -d{seconds:g}s")
            cpu0 = sum(cpu_seconds(p) for p in proxies)
            done = run(*pods.exec(pods.a, "wrk", "-t1", "-c32", f"-d{seconds:g}s", "--latency",
                                  f"http://{B_IP}:{port}/small"), timeout=seconds + 60)
            r = Run(config, "19B")
            parse_wrk(done.stdout, r)
            if config == "mesh":
                r.cpu_us_per_req = (sum(cpu_seconds(p) for p in proxies) - cpu0) * 1e6 / max(r.requests, 1)
            samples[config].append(r)
    for ns in (pods.a, pods.b):
        pods.iptables(ns, "--cleanup")
    for proc in proxies:
        pods.stop(proc)
    out = []
    for config, rs in samples.items():
        out.append(Run(config, "19B", rps=median([r.rps for r in rs]) or 0.0,
                       p50_ms=median([r.p50_ms for r in rs]), p99_ms=median([r.p99_ms for r in rs]),
                       requests=sum(r.requests for r in rs), errors=sum(r.errors for r in rs),
                       cpu_us_per_req=median([r.cpu_us_per_req for r in rs])))
    out[1].vs_direct = out[1].rps / out[0].rps if out[0].rps else None
    return out


def report(connects: list[Connect], e2e: list[Run], count: int, seconds: float, rounds: int) -> None:
    by = {c.config: c for c in connects}
    print(f"connect() from pod a, {count} sequential connections per row and round, {rounds} round(s), "
          "medians; conn/s from 2 clients")
    head = (f"{'config':<14}{'p50 us':>9}{'p99 us':>9}{'conn/s':>9}{'added p50':>11}{'p50 ratio':>11}"
            f"{'cpu us/SYN':>12}")
    print(head)
    print("-" * len(head))
    for c in connects:
        base = by.get(BASELINE.get(c.config, ""))
        ratio = c.p50_us / base.p50_us if base else None
        print(f"{c.config:<14}{c.p50_us:>9.1f}{c.p99_us:>9.1f}{fmt(c.conn_per_s, '>9.0f')}"
              f"{fmt(c.added_p50_us, '>11.1f')}{fmt(ratio, '>11.2f')}"
              f"{fmt(c.decider_cpu_us_per_syn, '>12.1f')}")
    print("(added p50 and p50 ratio against: nat, nfq-floor, nfq-pass -> none; nfq-queued, nfq-redirect ->"
          " nat;\n nfq-floor: a NetfilterQueue reader that accepts unread, the mechanism's own cost)")
    print()
    print(f"client -> sidecar -> sidecar -> server, wrk -t1 -c32, {rounds} round(s) of {seconds:g} s, "
          "medians")
    head = (f"{'config':<8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req':>11}{'/direct':>9}"
            f"{'errors':>7}")
    print(head)
    print("-" * len(head))
    for r in e2e:
        print(f"{r.config:<8}{r.rps:>10.0f}{fmt(r.p50_ms, '>9.3f')}{fmt(r.p99_ms, '>9.3f')}"
              f"{fmt(r.cpu_us_per_req, '>11.1f')}{fmt(r.vs_direct, '>9.2f')}{r.errors:>7}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_accept":
        _accept(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_connect":
        _connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s rates, one 2 s wrk round (under a minute)")
    ap.add_argument("--connections", type=int, default=5000, help="sequential connects per connect() row")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every connect() row and of the wrk runs; the tables show medians")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("mesh.py needs root (network namespaces, iptables, NFQUEUE)")
    seconds, rounds, rate = (2.0, 1, 1.0) if opts.quick else (opts.duration, opts.rounds, 3.0)
    ensure_tools()
    try:
        import netfilterqueue  # noqa: F401
        have_nfq = True
    except ImportError:
        log("NetfilterQueue is missing: no decider rows (pip install NetfilterQueue)")
        have_nfq = False
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-bench-mesh-"))
    pods = Pods(tmp)
    try:
        pods.up()
        connects = bench_connect(pods, opts.connections, rate, have_nfq, rounds)
        e2e = bench_e2e(pods, seconds, rounds)
    finally:
        pods.down()
        shutil.rmtree(tmp, ignore_errors=True)
    report(connects, e2e, opts.connections, seconds, rounds)
    added = {c.config: c.added_p50_us for c in connects if c.config.startswith("nfq")}
    print(json.dumps({"benchmark": "mesh", "connections": opts.connections, "seconds": seconds,
                      "rounds": rounds, "goal_added_p50_us": GOAL_ADDED_P50_US, "decider_added_p50_us": added,
                      "connect": [asdict(c) for c in connects], "e2e": [asdict(r) for r in e2e]}))


if __name__ == "__main__":
    main()
