"""`meshctl proxy`: run the sidecar (the agent starts it; tests and benchmarks run it directly)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from bus import endpoints, logs
from meshapi import ports


def _labels(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value")
        out[key] = value
    return out


@click.command("proxy")
@click.option("--id", "node_id", required=True, help="Proxy id (Istio's pod name).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--labels", default="", help="Workload labels, k=v,k=v (they pick the config group).")
@click.option("--service-account", default="default", show_default=True)
@click.option("--ip", default="127.0.0.1", show_default=True, help="Workload IP (registered with pilot).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Standalone: a proxy config file in pilot's schema (JSON/YAML; SIGHUP re-reads).")
@click.option("--keys", "key_dir", envvar="ZMESH_KEYS", type=click.Path(file_okay=False),
              help="Mesh key directory: follow pilot over the bus.")
@click.option("--name", default="proxy", show_default=True, help="Our bus key name.")
@click.option("--pilot-host", default="127.0.0.1", show_default=True)
@click.option("--port-base", type=int, default=None, help="Control-plane port base (ZMESH_PORT_BASE).")
@click.option("--relay", default=None,
              help="Node agent relay prefix, e.g. ipc:///run/zmesh/cfg (.pub/.snap).")
@click.option("--register/--no-register", default=False, show_default=True,
              help="Register and heartbeat with pilot ourselves (when no node agent does).")
@click.option("--mode", type=click.Choice(["transparent", "explicit"]), default="transparent",
              show_default=True)
@click.option("--explicit-host", default="127.0.0.1", show_default=True,
              help="Explicit mode: the address of the outbound listeners (one per service port).")
@click.option("--inbound-host", default=None,
              help="Explicit mode: the address of the inbound listener (default: --explicit-host).")
@click.option("--app-host", default="127.0.0.1", show_default=True,
              help="Where inbound traffic reaches the app (loopback pods each have an address).")
@click.option("--workers", type=int, default=0, help="Worker processes (0: one per core).")
@click.option("--outbound-port", type=int, default=ports.OUTBOUND, show_default=True)
@click.option("--inbound-port", type=int, default=ports.INBOUND, show_default=True)
@click.option("--admin-port", type=int, default=ports.PROXY_ADMIN, show_default=True)
@click.option("--stats-port", type=int, default=ports.PROXY_METRICS, show_default=True)
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@click.option("--max-connections", type=click.IntRange(min=0), default=0, show_default=True,
              help="Downstream connections each worker holds at most (Envoy's global_downstream_max_"
                   "connections); past it new ones are closed at once. 0: a third of the open-file limit.")
@click.option("--certs", "certs_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The workload's certificate directory (the node agent's <run-dir>/certs/<id>): "
                   "Istio mutual TLS, reloaded when its version file changes.")
@click.option("--splice/--no-splice", default=True, show_default=True,
              help="L4 bulk transfers move socket to socket in the kernel (splice); --no-splice copies "
                   "every byte through userspace (to measure the difference).")
def proxy_command(node_id: str, namespace: str, labels: str, service_account: str, ip: str,
                  config_file: Path | None, key_dir: str | None, name: str, pilot_host: str,
                  port_base: int | None, relay: str | None, register: bool, mode: str, explicit_host: str,
                  inbound_host: str | None, app_host: str, workers: int,
                  outbound_port: int, inbound_port: int, admin_port: int, stats_port: int,
                  access_log: bool, max_connections: int, certs_dir: Path | None, splice: bool) -> None:
    """Run the sidecar proxy."""
    from dataplane.proxy.main import BusOptions, Sidecar
    from dataplane.proxy.stats import Workload
    from dataplane.proxy.worker import WorkerOptions

    if (config_file is None) == (key_dir is None):
        raise click.UsageError("give exactly one of --config (standalone) and --keys (follow pilot)")
    logs.configure()
    label_map = _labels(labels)
    app = label_map.get("app", node_id)
    workload = Workload(name=label_map.get("app", node_id), namespace=namespace, app=app,
                        version=label_map.get("version", "unknown"),
                        canonical_service=label_map.get("service.istio.io/canonical-name", app),
                        canonical_revision=label_map.get("service.istio.io/canonical-revision",
                                                         label_map.get("version", "latest")))
    opts = WorkerOptions(node_id=node_id, workload=workload, mode=mode, outbound_port=outbound_port,
                         inbound_port=inbound_port, access_log=access_log, explicit_host=explicit_host,
                         inbound_host=inbound_host, app_host=app_host, max_connections=max_connections,
                         certs=str(certs_dir) if certs_dir is not None else None, splice=splice)
    bus = None
    if key_dir is not None:
        pub = f"{relay}.pub" if relay else endpoints.tcp("pilot", "pub", pilot_host, port_base)
        snap = f"{relay}.snap" if relay else endpoints.tcp("pilot", "snapshot", pilot_host, port_base)
        bus = BusOptions(pub, snap, endpoints.tcp("pilot", "rpc", pilot_host, port_base), key_dir, name,
                         {"namespace": namespace, "labels": label_map, "service_account": service_account,
                          "ip": ip}, register=register)
    sidecar = Sidecar(opts, workers or os.cpu_count() or 1, admin_port=admin_port, stats_port=stats_port)
    sidecar.run(bus=bus, config_file=config_file)
