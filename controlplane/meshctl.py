"""`meshctl`: the operator's command line for zmesh."""

from __future__ import annotations

import click

from bus.cli import bus_group
from controlplane.citadel.cli import ca_group, citadel_command
from controlplane.config.analyze_cli import analyze_command
from controlplane.galley.cli import apply_command, galley_command, get_command
from controlplane.pilot.cli import pilot_command, proxy_config_command, proxy_status_command
from dataplane.agent.cli import agent_command, wait_command
from dataplane.init.cli import decider_command, iptables_command
from dataplane.proxy.cli import proxy_command
from nodeagent.cli import nodeagent_command


@click.group()
@click.version_option(package_name="zmesh")
def cli() -> None:
    """Operate a zmesh service mesh."""


cli.add_command(bus_group)
cli.add_command(analyze_command)
cli.add_command(galley_command)
cli.add_command(apply_command)
cli.add_command(get_command)
cli.add_command(pilot_command)
cli.add_command(proxy_status_command)
cli.add_command(proxy_config_command)
cli.add_command(iptables_command)
cli.add_command(decider_command)
cli.add_command(proxy_command)
cli.add_command(citadel_command)
cli.add_command(ca_group)
cli.add_command(nodeagent_command)
cli.add_command(agent_command)
cli.add_command(wait_command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
