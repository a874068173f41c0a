"""`meshctl`: the operator's command line for zmesh.

Commands are imported when they run, not all at start: the sidecar is `meshctl proxy`, and
importing every component (cryptography, the control plane) into it would cost each proxy
process some 20 MB it never uses, and every command a slower start.
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "agent": "dataplane.agent.cli:agent_command",
    "analyze": "controlplane.config.analyze_cli:analyze_command",
    "apply": "controlplane.galley.cli:apply_command",
    "bus": "bus.cli:bus_group",
    "ca": "controlplane.citadel.cli:ca_group",
    "citadel": "controlplane.citadel.cli:citadel_command",
    "decider": "dataplane.init.cli:decider_command",
    "down": "meshctl.localmesh.cli:down_command",
    "galley": "controlplane.galley.cli:galley_command",
    "get": "controlplane.galley.cli:get_command",
    "iptables": "dataplane.init.cli:iptables_command",
    "nodeagent": "nodeagent.cli:nodeagent_command",
    "pilot": "controlplane.pilot.cli:pilot_command",
    "proxy": "dataplane.proxy.cli:proxy_command",
    "proxy-config": "controlplane.pilot.cli:proxy_config_command",
    "proxy-status": "controlplane.pilot.cli:proxy_status_command",
    "up": "meshctl.localmesh.cli:up_command",
    "wait": "dataplane.agent.cli:wait_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="zmesh")
def cli() -> None:
    """Operate a zmesh service mesh."""


def main() -> None:
    cli()
