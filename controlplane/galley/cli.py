"""`meshctl galley` (run the service), `meshctl apply` and `meshctl get`.

apply and get work on the configured source directly (directory or etcd); apply
validates first and refuses invalid input with the same diagnostics galley logs, all or
nothing: a kind zmesh does not support, or a resource defined twice (ZM0002), refuses
the whole invocation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import yaml
from prometheus_client import start_http_server

from bus import endpoints, keys, logs
from bus.loop import Loop
from bus.service import run_until_signalled, signed_publisher
from controlplane.config.analyze import first_definitions
from controlplane.config.diagnostics import ERROR, Diagnostic
from controlplane.config.model import SUPPORTED, Resource
from controlplane.config.validate import load_paths, yaml_files
from controlplane.config.yamlload import read_config_file
from controlplane.galley.etcd import EtcdClient, EtcdError
from controlplane.galley.service import Galley
from controlplane.galley.source_dir import DirectorySource, is_config_file, write_atomically
from controlplane.galley.source_etcd import EtcdSource
from controlplane.galley.store import REFUSED, ConfigStore

DEFAULT_CONFIG_DIR = os.path.expanduser("~/.zmesh/config")
DEFAULT_ETCD_PREFIX = "/zmesh/config/"
# kubectl's short names for Istio's and Kubernetes' kinds
SHORT_NAMES = {"vs": "VirtualService", "dr": "DestinationRule", "se": "ServiceEntry", "we": "WorkloadEntry",
               "gw": "Gateway", "pa": "PeerAuthentication", "ap": "AuthorizationPolicy",
               "ra": "RequestAuthentication", "svc": "Service", "deploy": "Deployment", "po": "Pod",
               "ns": "Namespace", "sa": "ServiceAccount"}

source_options = [
    click.option("--config-dir", envvar="ZMESH_CONFIG_DIR", default=DEFAULT_CONFIG_DIR, show_default=True,
                 type=click.Path(file_okay=False), help="The watched config directory."),
    click.option("--etcd", envvar="ZMESH_ETCD", default=None,
                 help="Use etcd at this URL (http://host:port) instead of the directory."),
    click.option("--etcd-prefix", envvar="ZMESH_ETCD_PREFIX", default=DEFAULT_ETCD_PREFIX, show_default=True),
]


def with_source(fn):
    for option in reversed(source_options):
        fn = option(fn)
    return fn


def unit_name(r: Resource) -> str:
    """Where `meshctl apply` keeps a resource: one unit per resource."""
    return f"{r.namespace or '_cluster'}/{r.kind.lower()}-{r.name}.yaml"


def target_unit(r: Resource, etcd: str | None, prefix: str) -> str:
    """The unit (etcd key or file under the directory) `meshctl apply` writes `r` to."""
    return prefix + unit_name(r) if etcd else unit_name(r)


def read_store(config_dir: str, etcd: str | None, prefix: str) -> ConfigStore:
    store = ConfigStore()
    if etcd:
        try:
            _, kvs = EtcdClient(etcd).get_prefix(prefix)
        except EtcdError as exc:
            raise click.ClickException(str(exc)) from None
        for kv in kvs:
            store.update(kv.key, kv.value)
    else:
        root = Path(config_dir)
        for f in yaml_files([root]) if root.is_dir() else []:
            if is_config_file(f):  # what galley's directory source reads, no more
                store.update(str(f.relative_to(root)), read_config_file(f))
    return store


def refuse_on_errors(diagnostics: list[Diagnostic]) -> None:
    """Print every diagnostic; any error refuses the whole invocation."""
    for d in diagnostics:
        click.echo(str(d), err=True)
    errors = sum(d.level == ERROR for d in diagnostics)
    if errors:
        raise click.ClickException(f"refused: {errors} error(s); nothing was applied")


@click.command("apply")
@click.option("-f", "--filename", "paths", multiple=True, required=True, type=click.Path(exists=True),
              help="A YAML file or a directory of them.")
@with_source
def apply_command(paths: tuple[str, ...], config_dir: str, etcd: str | None, etcd_prefix: str) -> None:
    """Validate config and write it to the mesh's config source."""
    result = load_paths(list(paths), strict=True)
    _, twice = first_definitions(result.resources, consequence=REFUSED)
    refuse_on_errors(result.diagnostics + twice)
    current = read_store(config_dir, etcd, etcd_prefix)
    owners = {key: unit for unit, u in current.units.items() for key in u.resources}
    elsewhere = {}  # resources the source holds in another unit (a hand-written file)
    for r in result.resources:
        owner = owners.get(r.key)
        if owner is not None and owner != target_unit(r, etcd, etcd_prefix):
            elsewhere[r.key] = current.snapshot[r.key]
    refuse_on_errors(first_definitions(result.resources, elsewhere, "edit it there")[1])
    for r in result.resources:
        text = yaml.safe_dump(r.raw, sort_keys=False)
        if etcd:
            EtcdClient(etcd).put(target_unit(r, etcd, etcd_prefix), text)
        else:
            write_atomically(Path(config_dir) / unit_name(r), text)
        click.echo(f"{r.kind.lower()}/{r.name} ({r.namespace or 'cluster'}) applied")


@click.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table")
@with_source
def get_command(kind: str, name: str | None, namespace: str | None, output: str, config_dir: str,
                etcd: str | None, etcd_prefix: str) -> None:
    """Read config back from the mesh's config source."""
    kinds = {k.lower(): k for k in SUPPORTED} | SHORT_NAMES
    canonical = kinds.get(kind.lower()) or kinds.get(kind.lower().removesuffix("s"))
    if canonical is None:
        raise click.ClickException(f"unknown kind {kind!r} (known: {', '.join(sorted(SUPPORTED))})")
    store = read_store(config_dir, etcd, etcd_prefix)
    for d in store.diagnostics():  # files galley refuses too: what they hold is not shown
        if d.level == ERROR:
            click.echo(f"rejected: {d}", err=True)
    found = [r for key, r in sorted(store.snapshot.items())
             if key.kind == canonical and (name is None or key.name == name)
             and (namespace is None or key.namespace == namespace)]
    if name is not None and not found:
        raise click.ClickException(f"{canonical} {name!r} not found")
    if output == "json":
        click.echo(json.dumps([r.raw for r in found], indent=2, default=str))
    elif output == "yaml":
        click.echo(yaml.safe_dump_all([r.raw for r in found], sort_keys=False), nl=False)
    else:
        click.echo(f"{'NAMESPACE':<20} {'NAME':<40} SOURCE")
        for r in found:
            click.echo(f"{r.namespace:<20} {r.name:<40} {r.file}")


@click.command("galley")
@with_source
@click.option("--keys", "key_dir", envvar="ZMESH_KEYS", required=True, type=click.Path(file_okay=False))
@click.option("--name", default="galley", show_default=True, help="Our key name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--metrics-host", default=None,
              help="Address for /metrics, where Prometheus scrapes it [default: --host]. Only pilot reads "
                   "galley's bus, so --host can stay on loopback while the metrics are reachable.")
@click.option("--port-base", type=int, default=None, help="Move every control-plane port (ZMESH_PORT_BASE).")
@click.option("--debounce", type=float, default=0.02, show_default=True)
def galley_command(config_dir: str, etcd: str | None, etcd_prefix: str, key_dir: str, name: str,
                   host: str, metrics_host: str | None, port_base: int | None, debounce: float) -> None:
    """Run galley: watch the config source, validate, publish snapshots on the bus."""
    logs.configure()
    ring = keys.Keyring(key_dir, name)
    loop = Loop("galley")
    try:
        pub = signed_publisher(loop, "galley", ring, host, port_base)
    except keys.KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    galley = Galley(loop, pub, debounce=debounce)
    start_http_server(endpoints.port("galley", "metrics", port_base), addr=metrics_host or host)
    if etcd:
        source = EtcdSource(loop, etcd, etcd_prefix, galley.on_unit)
        source.start()
    else:
        directory = DirectorySource(loop, config_dir, galley.on_unit)
        loop.call_soon_threadsafe(directory.start)
    galley.log.info("galley running", source=etcd or config_dir, pub=pub.pub_endpoint)
    run_until_signalled(loop)

