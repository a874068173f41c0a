"""`meshctl iptables` (Istio's istio-iptables, with its flags) and `meshctl decider` (the NFQUEUE decider)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from bus import logs
from bus.logs import Log
from dataplane.init import iptables, rules
from meshapi import ports
from meshapi.identity import PROXY_UID

T = TypeVar("T")
_log = Log("init")


def _parse(parser: Callable[[str], T], flag: str, text: str) -> T:
    try:
        return parser(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


@click.command("iptables")
@click.option("-p", "--envoy-port", "proxy_port", type=click.IntRange(1, 65535), default=ports.OUTBOUND,
              show_default=True, help="Where outbound connections are redirected.")
@click.option("-z", "--inbound-capture-port", "inbound_port", type=click.IntRange(1, 65535),
              default=ports.INBOUND, show_default=True, help="Where inbound connections are redirected.")
@click.option("-u", "--proxy-uid", default=str(PROXY_UID), show_default=True,
              help="The proxy's user ids (comma-separated); their traffic is not redirected.")
@click.option("-g", "--proxy-gid", default=None, help="The proxy's group ids [default: the -u list].")
@click.option("-m", "--istio-inbound-interception-mode", "mode", type=click.Choice(["REDIRECT"]),
              default="REDIRECT", show_default=True, help="Inbound capture (TPROXY is not supported).")
@click.option("-i", "--istio-service-cidr", "include_cidrs", default="*", show_default=True,
              help="Outbound CIDRs to redirect; '*' for all, '' for none.")
@click.option("-x", "--istio-service-exclude-cidr", "exclude_cidrs", default="",
              help="Outbound CIDRs never redirected.")
@click.option("-b", "--istio-inbound-ports", "include_inbound", default="*", show_default=True,
              help="Inbound ports to redirect; '*' for all, '' for none.")
@click.option("-d", "--istio-local-exclude-ports", "exclude_inbound", default="",
              help="Inbound ports not redirected with -b '*' (the sidecar's own never are).")
@click.option("-q", "--istio-outbound-ports", "include_outbound", default="",
              help="Outbound ports redirected whatever their destination.")
@click.option("-o", "--istio-local-outbound-ports-exclude", "exclude_outbound", default="",
              help="Outbound ports never redirected.")
@click.option("-c", "--istio-exclude-interfaces", "exclude_interfaces", default="",
              help="Interfaces whose traffic is never redirected.")
@click.option("--nfqueue", type=click.IntRange(0, 65535), default=None,
              help="Let the decider on this NFQUEUE pick which new outbound connections are redirected.")
@click.option("--queue-bypass/--no-queue-bypass", default=False, show_default=True,
              help="With --nfqueue: fail open (go direct) rather than closed when no decider runs.")
@click.option("--ipv6/--no-ipv6", default=True, show_default=True, help="Also install the ip6tables rules.")
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input instead of applying it.")
@click.option("--cleanup", "--clean", is_flag=True, help="Remove our chains and the jumps into them.")
def iptables_command(proxy_port: int, inbound_port: int, proxy_uid: str, proxy_gid: str | None, mode: str,
                     include_cidrs: str, exclude_cidrs: str, include_inbound: str, exclude_inbound: str,
                     include_outbound: str, exclude_outbound: str, exclude_interfaces: str,
                     nfqueue: int | None, queue_bypass: bool, ipv6: bool, dry_run: bool,
                     cleanup: bool) -> None:
    """Install (or update, or remove) the rules that send the pod's traffic through its sidecar."""
    if queue_bypass and nfqueue is None:
        raise click.UsageError("--queue-bypass needs --nfqueue")
    uids = _parse(rules.parse_names, "-u", proxy_uid)
    opts = rules.Options(
        proxy_port=proxy_port, inbound_port=inbound_port, proxy_uids=uids,
        proxy_gids=uids if proxy_gid is None else _parse(rules.parse_names, "-g", proxy_gid),
        include_cidrs=_parse(rules.or_all(rules.parse_cidrs), "-i", include_cidrs),
        exclude_cidrs=_parse(rules.parse_cidrs, "-x", exclude_cidrs),
        include_inbound_ports=_parse(rules.or_all(rules.parse_ports), "-b", include_inbound),
        exclude_inbound_ports=_parse(rules.parse_ports, "-d", exclude_inbound),
        include_outbound_ports=_parse(rules.parse_ports, "-q", include_outbound),
        exclude_outbound_ports=_parse(rules.parse_ports, "-o", exclude_outbound),
        exclude_interfaces=_parse(rules.parse_names, "-c", exclude_interfaces),
        nfqueue=nfqueue, queue_bypass=queue_bypass)
    logs.configure()
    for family in (4, 6) if ipv6 else (4,):
        try:
            current = iptables.save(family)
        except iptables.IptablesError as exc:
            if not dry_run:
                hint = "; --no-ipv6 skips IPv6" if family == 6 else ""
                raise click.ClickException(f"{exc}{hint}") from None
            click.echo(f"# cannot read the current rules ({exc}); shown for an empty rule set")
            current = ""
        text = rules.cleanup_text(current) if cleanup else rules.install_text(opts, family, current)
        if dry_run:
            click.echo("# " + " ".join(iptables.restore_args(family)))
            click.echo(text, nl=False)
            continue
        try:
            iptables.restore(family, text)
        except iptables.IptablesError as exc:
            raise click.ClickException(str(exc)) from None
        _log.info("rules removed" if cleanup else "rules installed", family=f"ipv{family}")


@click.command("decider")
@click.option("--queue", type=click.IntRange(0, 65535), required=True, help="The NFQUEUE number (--nfqueue).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A proxy config in pilot's schema (JSON/YAML); re-read on SIGHUP or change.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics (zmesh_init_verdicts_total) on this port.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True)
@click.option("--fast-path/--no-fast-path", default=True, show_default=True,
              help="Also write the verdicts into the mangle chain ISTIO_KNOWN, so the kernel marks SYNs "
                   "without queueing them.")
def decider_command(queue: int, config_file: Path, metrics_port: int | None, metrics_host: str,
                    fast_path: bool) -> None:
    """Decide, for each new outbound connection, whether it goes through the proxy."""
    if importlib.util.find_spec("netfilterqueue") is None:
        raise click.ClickException("the decider needs NetfilterQueue: apt-get install libnetfilter-queue-dev "
                                   "gcc, then pip install NetfilterQueue")
    from dataplane.init import decider

    logs.configure()
    decider.run(queue, config_file, metrics_port, metrics_host, fast_path)
