"""`meshctl pilot` (run it), `meshctl proxy-status` and `meshctl proxy-config`."""

from __future__ import annotations

import json

import click
from prometheus_client import start_http_server

from bus import endpoints, keys, logs
from bus.rpc import RpcClient, RpcError, RpcTimeout

SECTIONS = ("listeners", "routes", "clusters", "endpoints", "secrets", "all")

key_options = [
    click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False),
                 help="The mesh key directory."),
    click.option("--as", "name", envvar="ZMESH_NAME", default="meshctl", show_default=True,
                 help="Our key name in the key directory."),
    click.option("--pilot", "pilot_endpoint", default=None, help="Pilot's RPC endpoint."),
    click.option("--port-base", type=int, default=None, help="Control-plane port base (ZMESH_PORT_BASE)."),
]


def with_keys(fn):
    for option in reversed(key_options):
        fn = option(fn)
    return fn


def _call(key_dir: str, name: str, pilot_endpoint: str | None, port_base: int | None, method: str,
          body: object = None) -> object:
    endpoint = pilot_endpoint or endpoints.tcp("pilot", "rpc", base=port_base)
    try:
        client = RpcClient(endpoint, keys.Keyring(key_dir, name), "pilot", origin=name, timeout=2.0,
                           retries=1)
    except keys.KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        return client.call(method, body)
    except (RpcError, RpcTimeout) as exc:
        raise click.ClickException(f"pilot at {endpoint}: {exc}") from None
    finally:
        client.close()


@click.command("proxy-status")
@with_keys
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def proxy_status_command(key_dir: str, name: str, pilot_endpoint: str | None, port_base: int | None,
                         output: str) -> None:
    """Each proxy's config state: SYNCED, SENT, STALE, NACKED or NOT SENT."""
    rows = _call(key_dir, name, pilot_endpoint, port_base, "status")
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':<40} {'STATE':<9} {'SENT':<18} {'ACKED':<18} {'IN FORCE':<18} {'CONTACT':>8}  ERROR")
    for r in rows:
        contact = "-" if r["since_contact_s"] is None else f"{r['since_contact_s']:.1f}s"
        click.echo(f"{r['proxy']:<40} {r['state']:<9} {r['sent'][:16]:<18} {r['acked'][:16]:<18} "
                   f"{r['in_force'][:16]:<18} {contact:>8}  {r['error']}")


@click.command("proxy-config")
@with_keys
@click.argument("proxy")
@click.argument("section", type=click.Choice(SECTIONS), default="all")
@click.option("-o", "--output", type=click.Choice(["json", "table"]), default="json")
def proxy_config_command(key_dir: str, name: str, pilot_endpoint: str | None, port_base: int | None,
                         proxy: str, section: str, output: str) -> None:
    """The config PROXY reports it applied (its ACKed version, or the one in force after a NACK)."""
    reply = _call(key_dir, name, pilot_endpoint, port_base, "config", {"proxy": proxy})
    if not reply["version"]:
        raise click.ClickException(f"{proxy} has not applied any config yet (sent: {reply['sent'] or '-'})")
    if not reply["known"]:
        raise click.ClickException(f"{proxy} runs version {reply['version']}, which pilot no longer holds")
    config = reply["config"]
    part = config if section == "all" else config.get("security" if section == "secrets" else section)
    if output == "json":
        click.echo(json.dumps({"proxy": proxy, "version": reply["version"], section: part}, indent=2))
    else:
        items = part if isinstance(part, list) else [part]
        for item in items:
            click.echo(json.dumps(item, sort_keys=True))


@click.command("pilot")
@click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False))
@click.option("--name", default="pilot", show_default=True, help="Our key name.")
@click.option("--galley-name", default="galley", show_default=True, help="Galley's key name.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port-base", type=int, default=None)
@click.option("--debounce-after", type=float, default=0.1, show_default=True, help="Quiet time (s).")
@click.option("--debounce-max", type=float, default=10.0, show_default=True, help="Longest wait (s).")
@click.option("--lease", type=float, default=15.0, show_default=True,
              help="Seconds a registration lives without a heartbeat.")
@click.option("--mesh-config", "mesh_config_path", type=click.Path(dir_okay=False), default=None,
              help="Istio's MeshConfig YAML (pilot-discovery --meshConfig); re-read when it changes.")
def pilot_command(key_dir: str, name: str, galley_name: str, host: str, port_base: int | None,
                  debounce_after: float, debounce_max: float, lease: float,
                  mesh_config_path: str | None) -> None:
    """Run pilot: galley's config + registrations in, per-group proxy config out."""
    from bus.loop import Loop
    from bus.service import run_until_signalled, signed_publisher
    from bus.signing import Verifier
    from controlplane.debounce import Debouncer
    from controlplane.pilot.meshconfig import MeshConfigError, MeshConfigFile
    from controlplane.pilot.xds.server import Pilot, serve_rpc, subscribe_galley

    logs.configure()
    mesh_file = MeshConfigFile(mesh_config_path) if mesh_config_path else None
    mesh_config: dict = {}
    warnings: list[str] = []
    if mesh_file is not None:  # before any socket: a refused start leaves nothing bound behind
        mesh_file.changed()
        try:
            mesh_config, warnings = mesh_file.read()
        except MeshConfigError as exc:
            raise click.ClickException(str(exc)) from None
    ring = keys.Keyring(key_dir, name)
    loop = Loop("pilot")
    try:
        pub = signed_publisher(loop, "pilot", ring, host, port_base)
    except keys.KeyringError as exc:
        loop.stop()
        raise click.ClickException(str(exc)) from None
    pilot = Pilot(loop, pub, Debouncer(debounce_after, debounce_max), lease=lease, mesh_config=mesh_config)
    for warning in warnings:
        pilot.log.warning("mesh config field ignored", detail=warning)
    if mesh_file is not None:
        loop.call_every(1.0, lambda: mesh_file.reload(pilot.set_mesh_config, pilot.log))
    subscribe_galley(loop, pilot, pub_endpoint=endpoints.tcp("galley", "pub", base=port_base),
                     snapshot_endpoint=endpoints.tcp("galley", "snapshot", base=port_base),
                     keyring=ring, server=galley_name, verifier=Verifier(ring.trusted_signers))
    serve_rpc(loop, pilot, endpoints.tcp("pilot", "rpc", host, port_base), ring)
    start_http_server(endpoints.port("pilot", "metrics", port_base), addr=host)
    pilot.log.info("pilot running", pub=pub.pub_endpoint)
    run_until_signalled(loop)
