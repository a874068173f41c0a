"""`meshctl nodeagent`: run the node agent of this node."""

from __future__ import annotations

import click
from prometheus_client import start_http_server

from bus import endpoints, keys, logs


def _owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    uid, sep, gid = value.partition(":")
    try:
        return int(uid), int(gid if sep else uid)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not UID[:GID]") from None


@click.command("nodeagent")
@click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False),
              help="The mesh key directory.")
@click.option("--name", required=True, help="Our key name; pilot and citadel know this node by it.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="agent.sock, cfg.pub, cfg.snap and certs/<workload-id>/ go here.")
@click.option("--workloads", "workloads_dir", type=click.Path(file_okay=False), default=None,
              help="A directory of workload files (*.yaml, *.yml, *.json), one workload each.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--port-base", type=int, default=None, help="Control-plane port base (ZMESH_PORT_BASE).")
@click.option("--pilot-host", default="127.0.0.1", show_default=True)
@click.option("--citadel-host", default="127.0.0.1", show_default=True)
@click.option("--pilot-name", default="pilot", show_default=True, help="Pilot's key name.")
@click.option("--citadel-name", default="citadel", show_default=True, help="Citadel's key name.")
@click.option("--cert-ttl", type=click.IntRange(min=1), default=None,
              help="Certificate lifetime to ask for, in seconds (default: citadel's).")
@click.option("--owner", default=None, metavar="UID[:GID]",
              help="Owner of the certificate files and sockets [default: uid 1337 if it exists, else ours].")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
def nodeagent_command(key_dir: str, name: str, run_dir: str, workloads_dir: str | None, trust_domain: str,
                      port_base: int | None, pilot_host: str, citadel_host: str, pilot_name: str,
                      citadel_name: str, cert_ttl: int | None, owner: str | None, metrics_host: str) -> None:
    """Run the node agent: workloads to pilot, keys and certificates for proxies, pilot's config relay."""
    from bus.loop import Loop
    from bus.service import run_until_signalled
    from nodeagent.agent import NodeAgent, Upstream

    logs.configure()
    ring = keys.Keyring(key_dir, name)
    loop = Loop("nodeagent")
    try:
        NodeAgent(loop, ring, run_dir=run_dir, workloads_dir=workloads_dir, trust_domain=trust_domain,
                  pilot=Upstream.of("pilot", pilot_host, port_base, pilot_name),
                  citadel=Upstream.of("citadel", citadel_host, port_base, citadel_name),
                  cert_ttl=cert_ttl, owner=_owner(owner))
    except keys.KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    start_http_server(endpoints.port("nodeagent", "metrics", port_base), addr=metrics_host)
    run_until_signalled(loop)
