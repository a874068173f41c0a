"""`meshctl up` (the whole mesh and bookinfo on this machine, until Ctrl-C) and `meshctl down`.

As root every pod is a network namespace with istio-init's rules (mesh.py); without root, or with
`--explicit`, the same demo runs in explicit mode on loopback addresses (loopback.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

ROOT_RUN_DIR = "/run/zmesh-up"
RUN_DIR_HELP = "Keys, galley's config directory, certificates, logs and the state `down` reads."


def default_run_dir() -> str:
    """Root's is /run/zmesh-up; a user's one they can write: $XDG_RUNTIME_DIR/zmesh-up, else ~/.zmesh/up."""
    if os.geteuid() == 0:
        return ROOT_RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "zmesh-up") if runtime else str(Path.home() / ".zmesh" / "up")


RUN_DIR_DEFAULT = f"{ROOT_RUN_DIR} as root, else $XDG_RUNTIME_DIR/zmesh-up or ~/.zmesh/up"


def _next_steps(mesh: object) -> str:
    from meshctl.localmesh.mesh import EXTERNAL_IP, EXTERNAL_PORT, Mesh

    assert isinstance(mesh, Mesh)
    page = mesh.pod("productpage")
    sleep = mesh.pod("sleep")
    meshctl = str(Path(sys.executable).with_name("meshctl"))
    status = " ".join([meshctl, *mesh.proxy_status_command()[3:]])
    return "\n".join([
        "",
        "The mesh is up. Try:",
        f"  curl -s http://{page.ip}:9080/productpage                 # from this host, into the mesh",
        f"  ip netns exec {sleep.ns} curl -s http://productpage:9080/productpage   # from a pod, by name",
        f"  ip netns exec {sleep.ns} curl -s -H 'end-user: jason' http://reviews:9080/reviews/0",
        f"  {status}",
        f"  curl -s http://{page.ip}:15020/stats/prometheus | grep istio_requests_total   # agent (merged)",
        f"  curl -s http://{page.ip}:15090/metrics | grep istio_requests_total           # proxy",
        f"  curl -s http://{EXTERNAL_IP}:{EXTERNAL_PORT}/   # 'the internet', outside the mesh",
        "Prometheus targets: each pod's :15020/stats/prometheus (it holds the proxy's :15090 too: scraping",
        "both doubles every series) and the control plane's and node agent's:",
        *(f"  {url}   # {name}" for name, url in mesh.metrics_endpoints().items()
          if not name.endswith((".sidecar", ".proxy"))),
        "Route traffic by dropping Istio YAML into the config directory galley watches:",
        f"  cp ../shared/testdata/istio/bookinfo/virtual-service-reviews-80-20.yaml {mesh.config_dir}/",
        f"Logs: {mesh.logs}/   Stop: Ctrl-C or `meshctl down --run-dir {mesh.run_dir}`",
    ])


def _loopback_steps(mesh: object) -> str:
    from meshctl.localmesh.loopback import LoopbackMesh
    from meshctl.localmesh.mesh import BOOKINFO

    assert isinstance(mesh, LoopbackMesh)
    page = mesh.pod("productpage")
    sleep = mesh.outbound_host(mesh.pod("sleep"))
    ports = mesh.ports(page)
    ext_host, ext_port = mesh.external
    meshctl = str(Path(sys.executable).with_name("meshctl"))
    pods = []
    for p in mesh.layout.pods:
        pp = mesh.ports(p)
        pods.append(f"  {p.name:<16} pod {p.ip:<15} sidecar out {mesh.outbound_host(p):<15} "
                    f"app {mesh.app_host(p) if p.serves else '-':<15} agent :{pp.metrics}/:{pp.health} "
                    f"proxy :{pp.admin}/:{pp.stats}")
    return "\n".join([
        "",
        "The mesh is up in explicit mode on loopback: no namespaces, no iptables; each app sends to its",
        "sidecar's address and names the service in the Host header. Pods (agent metrics/health, proxy "
        "admin/stats ports):",
        *pods,
        "Try:",
        f"  curl -s http://{page.ip}:9080/productpage             # into the mesh: productpage's sidecar",
        f"  curl -s -H 'Host: productpage' http://{sleep}:9080/productpage   # as sleep, via its sidecar",
        f"  curl -s -H 'Host: reviews' -H 'end-user: jason' http://{sleep}:9080/reviews/0",
        f"  {' '.join([meshctl, *mesh.proxy_status_command()[3:]])}",
        f"  curl -s http://127.0.0.1:{ports.metrics}/stats/prometheus | grep istio_requests_total  # agent",
        f"  curl -s http://127.0.0.1:{ports.stats}/metrics | grep istio_requests_total           # proxy",
        f"  curl -s http://{ext_host}:{ext_port}/   # 'the internet', outside the mesh",
        "Route traffic by dropping Istio YAML into the config directory galley watches:",
        f"  cp {BOOKINFO}/virtual-service-reviews-80-20.yaml {mesh.config_dir}/",
        f"Logs: {mesh.logs}/   Stop: Ctrl-C or `meshctl down --run-dir {mesh.run_dir}`",
    ])


@click.command("up")
@click.option("--run-dir", default=default_run_dir, show_default=RUN_DIR_DEFAULT,
              type=click.Path(file_okay=False), help=RUN_DIR_HELP)
@click.option("--timeout", type=float, default=90.0, show_default=True,
              help="Seconds the sidecars get to become ready.")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes per sidecar.")
@click.option("--explicit", is_flag=True,
              help="Explicit mode on loopback, no namespaces or iptables (what runs without root).")
def up_command(run_dir: str, timeout: float, workers: int, explicit: bool) -> None:
    """Run galley, pilot, citadel, a node agent and bookinfo with sidecars, each pod in its own
    network namespace (as root) or on loopback addresses in explicit mode, until Ctrl-C (or
    `meshctl down`)."""
    from meshctl.localmesh import netns
    from meshctl.localmesh.loopback import LoopbackMesh
    from meshctl.localmesh.mesh import Mesh, MeshError

    if not explicit and os.geteuid() != 0:
        click.echo("not root: no network namespaces or iptables, so explicit mode on loopback instead "
                   "(the same demo; run as root for transparent interception).")
        explicit = True
    if not explicit and (reason := netns.missing_tools()) is not None:
        raise click.ClickException(reason)
    state_file = Path(run_dir) / "state.json"
    if os.path.exists(state_file):  # False, not an error, where we may not look
        other = netns.State.load(state_file).info.get("pid")
        if other and other != os.getpid() and netns.alive(other):
            raise click.ClickException(f"a mesh is already up (pid {other}): "
                                       f"`meshctl down --run-dir {run_dir}`")
    mesh = (LoopbackMesh(run_dir, workers=workers, say=click.echo) if explicit
            else Mesh(run_dir, host_access=True, workers=workers, say=click.echo))
    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        mesh.up(timeout)
        click.echo(_loopback_steps(mesh) if explicit else _next_steps(mesh))
        while True:
            time.sleep(3600)
    except MeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("\nstopping the mesh ...")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        mesh.down()
        left = "process" if explicit else "namespace, rule or process"
        click.echo(f"the mesh is down: no {left} of it is left")


@click.command("down")
@click.option("--run-dir", default=default_run_dir, show_default=RUN_DIR_DEFAULT,
              type=click.Path(file_okay=False))
def down_command(run_dir: str) -> None:
    """Stop what `meshctl up` started and remove its namespaces (and what a crashed run left)."""
    from meshctl.localmesh import loopback, netns

    root = os.geteuid() == 0
    state_file = Path(run_dir) / "state.json"
    removed = state_file.exists()
    if removed:
        state = netns.State.load(state_file)
        explicit = state.info.get("mode") == "explicit"
        if not explicit and not root:
            raise click.ClickException("meshctl down needs root for a mesh in network namespaces")
        owner = state.info.get("pid")
        if owner and owner != os.getpid() and netns.alive(owner):
            os.kill(owner, signal.SIGTERM)  # `up` removes its own mesh; wait for it, bounded
            deadline = time.monotonic() + 30
            while netns.alive(owner) and time.monotonic() < deadline:
                time.sleep(0.1)
        netns.teardown(state)
        if explicit:
            loopback.sweep(state.info.get("run_id", ""))
        click.echo(f"removed the mesh recorded in {state_file}")
    swept = netns.sweep_stale() if root else []
    if swept:
        click.echo(f"removed {len(swept)} namespaces left by crashed runs")
    if stopped := loopback.sweep_stale():
        click.echo(f"stopped {len(stopped)} processes left by crashed loopback runs")
    if not removed and not swept and not stopped:
        click.echo("nothing to remove")

