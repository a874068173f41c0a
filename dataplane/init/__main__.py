"""`python -m dataplane.init iptables|decider`: the init container's entry point, without meshctl."""

import click

from dataplane.init.cli import decider_command, iptables_command


@click.group()
def main() -> None:
    """zmesh's istio-init."""


main.add_command(iptables_command)
main.add_command(decider_command)

if __name__ == "__main__":
    main()
