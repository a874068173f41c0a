"""`meshctl citadel` (run the CA) and `meshctl ca rotate-root|status` (operate it)."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import click
from prometheus_client import start_http_server

from bus import endpoints, keys, logs
from bus.rpc import RpcClient, RpcError, RpcTimeout
from controlplane.citadel.ca import DEFAULT_TTL_S, MAX_TTL_S, TRUST_DOMAIN

DEFAULT_CA_DIR = os.path.expanduser("~/.zmesh/ca")
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType):
    """Whole seconds, written `3600`, `90s`, `30m`, `24h` or `90d`."""
    name = "duration"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        m = _DURATION.fullmatch(str(value).strip())
        if m is None:
            self.fail(f"{value!r} is not a duration (e.g. 3600, 90s, 30m, 24h, 90d)", param, ctx)
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds < self.minimum:
            self.fail(f"{value!r} is shorter than {self.minimum} s", param, ctx)
        return seconds


@click.command("citadel")
@click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False),
              help="The mesh key directory.")
@click.option("--name", default="citadel", show_default=True, help="Our key name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port-base", type=int, default=None, help="Move every control-plane port (ZMESH_PORT_BASE).")
@click.option("--ca-dir", envvar="ZMESH_CA_DIR", default=DEFAULT_CA_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Where the self-signed root is created and kept.")
@click.option("--cacerts", type=click.Path(exists=True, file_okay=False), default=None,
              help="Istio's plugged-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem): "
                   "citadel becomes an intermediate; --ca-dir is not used.")
@click.option("--trust-domain", default=TRUST_DOMAIN, show_default=True)
@click.option("--default-ttl", type=Duration(), default=f"{DEFAULT_TTL_S // 3600}h", show_default=True,
              help="Certificate lifetime when a CSR asks for none.")
@click.option("--max-ttl", type=Duration(), default=f"{MAX_TTL_S // 86400}d", show_default=True,
              help="Longer requests are capped to this (and told so).")
@click.option("--admin", "admins", multiple=True, default=("meshctl",), show_default=True,
              help="Key names allowed to rotate the root (repeatable).")
@click.option("--pilot", "pilot_endpoint", default=None, help="Pilot's RPC endpoint (node authorization).")
@click.option("--pilot-name", default="pilot", show_default=True, help="Pilot's key name.")
@click.option("--trust-node-agents", is_flag=True,
              help="INSECURE, development only: any node agent may obtain any identity.")
@click.option("--retire-grace", "retire_grace", type=Duration(minimum=0), default="30s", show_default=True,
              help="After a rotation settles, how long the old root stays trusted.")
def citadel_command(key_dir: str, name: str, host: str, port_base: int | None, ca_dir: str,
                    cacerts: str | None, trust_domain: str, default_ttl: int, max_ttl: int,
                    admins: tuple[str, ...], pilot_endpoint: str | None, pilot_name: str,
                    trust_node_agents: bool, retire_grace: int) -> None:
    """Run citadel: sign workload CSRs over the bus, publish the trust bundle."""
    from bus.loop import Loop
    from bus.service import run_until_signalled, signed_publisher
    from controlplane.citadel.authz import NodeAuthorizer, RegistrationsAuthorizer, pilot_rpc
    from controlplane.citadel.authz import trust_node_agents as allow_all
    from controlplane.citadel.ca import CertificateAuthority
    from controlplane.citadel.pki import CaError, load_cacerts
    from controlplane.citadel.rotation import IssuanceTracker
    from controlplane.citadel.service import Citadel, serve_rpc
    from controlplane.citadel.store import CaDir

    logs.configure()
    log = logs.Log("citadel")
    ring = keys.Keyring(key_dir, name)
    store: CaDir | None = None
    try:
        ring.curve()  # fail before anything starts when our keys are missing
        ring.signing_key()
        if cacerts:
            signing, retiring, tracker = load_cacerts(cacerts), [], IssuanceTracker()
        else:
            store = CaDir(ca_dir)
            signing, retiring, tracker = store.load_or_create(trust_domain, time.time())
    except (CaError, keys.KeyringError) as exc:
        raise click.ClickException(str(exc)) from None
    authorize: NodeAuthorizer = allow_all
    pilot_loop = None
    if trust_node_agents:
        log.warning("INSECURE: --trust-node-agents: every node agent may obtain every identity; "
                    "node authorization is OFF")
    else:
        pilot_loop = Loop("citadel-pilot").start()
        endpoint = pilot_endpoint or endpoints.tcp("pilot", "rpc", base=port_base)
        authorize = RegistrationsAuthorizer(pilot_rpc(pilot_loop, endpoint, ring, pilot_name, name))
    try:
        ca = CertificateAuthority(signing, authorize, trust_domain=trust_domain, default_ttl_s=default_ttl,
                                  max_ttl_s=max_ttl, retiring=retiring, tracker=tracker, store=store,
                                  retire_grace_s=retire_grace)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    loop = Loop("citadel")
    pub = signed_publisher(loop, "citadel", ring, host, port_base)
    citadel = loop.call_sync(lambda: Citadel(loop, ca, pub, admins))
    serve_rpc(loop, citadel, endpoints.tcp("citadel", "rpc", host, port_base), ring)
    start_http_server(endpoints.port("citadel", "metrics", port_base), addr=host)
    log.info("citadel running", mode="plugged-in" if signing.plugged else "self-signed",
             root=signing.fingerprint[:16], trust_domain=trust_domain, pub=pub.pub_endpoint)
    run_until_signalled(loop)
    if pilot_loop is not None:
        pilot_loop.stop()


def _call(key_dir: str, name: str, endpoint: str | None, port_base: int | None, server: str,
          method: str) -> Any:
    endpoint = endpoint or endpoints.tcp("citadel", "rpc", base=port_base)
    try:
        client = RpcClient(endpoint, keys.Keyring(key_dir, name), server, origin=name, timeout=2.0, retries=1)
    except keys.KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        return client.call(method, {})
    except (RpcError, RpcTimeout) as exc:
        raise click.ClickException(f"citadel at {endpoint}: {exc}") from None
    finally:
        client.close()


ca_options = [
    click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False),
                 help="The mesh key directory."),
    click.option("--as", "name", envvar="ZMESH_NAME", default="meshctl", show_default=True,
                 help="Our key name in the key directory."),
    click.option("--citadel", "citadel_endpoint", default=None, help="Citadel's RPC endpoint."),
    click.option("--citadel-name", default="citadel", show_default=True, help="Citadel's key name."),
    click.option("--port-base", type=int, default=None, help="Control-plane port base (ZMESH_PORT_BASE)."),
]


def with_ca_options(fn):
    for option in reversed(ca_options):
        fn = option(fn)
    return fn


@click.group("ca")
def ca_group() -> None:
    """Operate citadel, the mesh's certificate authority."""


@ca_group.command("rotate-root")
@with_ca_options
def rotate_root_command(key_dir: str, name: str, citadel_endpoint: str | None, citadel_name: str,
                        port_base: int | None) -> None:
    """Start a root rotation: new certificates come from a new root; the old root stays trusted
    until every identity has moved (watch it with `meshctl ca status`)."""
    reply = _call(key_dir, name, citadel_endpoint, port_base, citadel_name, "rotate_root")
    click.echo(f"new root {reply['fingerprint'][:16]} ({reply['subject']}); phase {reply['phase']}; "
               f"{reply['identities']} identities to re-issue")


@ca_group.command("status")
@with_ca_options
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status_command(key_dir: str, name: str, citadel_endpoint: str | None, citadel_name: str,
                   port_base: int | None, output: str) -> None:
    """Roots, rotation phase and progress, certificates issued and refused."""
    s = _call(key_dir, name, citadel_endpoint, port_base, citadel_name, "status")
    if output == "json":
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"trust domain {s['trust_domain']} ({s['mode']}), bundle {s['bundle_version']}")
    click.echo(f"{'ROLE':<9} {'FINGERPRINT (SHA-256)':<66} {'NOT AFTER':<21} SUBJECT")
    rows = s["roots"] if s["mode"] == "self-signed" else [s["signing_ca"], *s["roots"]]
    for r in rows:
        click.echo(f"{r['role']:<9} {r['fingerprint']:<66} {r['not_after']:<21} {r['subject']}")
    rot = s["rotation"]
    if rot["phase"] == "idle":
        click.echo("rotation: idle")
    else:
        click.echo(f"rotation: {rot['phase']} since {rot['started']}: {rot['reissued']} of {rot['total']} "
                   f"identities re-issued, {rot['expired']} expired, {rot['pending']} pending")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(s["refused"].items())) or "none"
    click.echo(f"issued {s['issued']}; refused {sum(s['refused'].values())} ({refused})")
