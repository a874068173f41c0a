"""`meshctl`: the operator's command line for zmesh."""

from __future__ import annotations

import click

from bus.cli import bus_group


@click.group()
@click.version_option(package_name="zmesh")
def cli() -> None:
    """Operate a zmesh service mesh."""


cli.add_command(bus_group)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
