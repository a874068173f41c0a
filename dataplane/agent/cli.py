"""`meshctl agent` (Istio's pilot-agent) and `meshctl wait` (holdApplicationUntilProxyStarts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from bus import logs
from meshapi import ports


@click.command("agent")
@click.option("--health-port", type=int, default=ports.HEALTH, show_default=True,
              help="Serves /healthz/ready.")
@click.option("--metrics-port", type=int, default=ports.AGENT_METRICS, show_default=True,
              help="Serves /stats/prometheus: agent, proxy and app metrics merged.")
@click.option("--proxy-admin-port", type=int, default=ports.PROXY_ADMIN, show_default=True,
              help="The proxy's admin port (passed to it as --admin-port).")
@click.option("--proxy-stats-port", type=int, default=ports.PROXY_METRICS, show_default=True,
              help="The proxy's metrics port (passed to it as --stats-port).")
@click.option("--app-metrics", default=None, help="The app's Prometheus URL, merged into ours.")
@click.option("--proxy-uid", type=int, default=None, help="Run the proxy as this user (Istio: 1337).")
@click.option("--proxy-gid", type=int, default=None, help="Run the proxy in this group (Istio: 1337).")
@click.option("--termination-drain-duration", type=float, default=5.0, show_default=True,
              help="Seconds the draining proxy gets for in-flight work on SIGTERM.")
@click.option("--restart-initial", type=float, default=1.0, show_default=True,
              help="First restart delay (seconds); doubles per crash.")
@click.option("--restart-max", type=float, default=30.0, show_default=True, help="Restart delay cap.")
@click.option("--restart-reset", type=float, default=60.0, show_default=True,
              help="Uptime (seconds) after which the restart delay starts over.")
@click.option("--handover-admin-port", type=int, default=ports.HANDOVER_ADMIN, show_default=True,
              help="Admin port of the proxy a hand-over (SIGHUP) starts while the old one still runs.")
@click.option("--handover-stats-port", type=int, default=ports.HANDOVER_METRICS, show_default=True,
              help="Metrics port of the proxy a hand-over starts.")
@click.option("--certs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The workload's certificate directory (key.pem, cert-chain.pem, root-cert.pem): "
                   "not ready until they exist and are valid.")
@click.option("--decider-queue", type=click.IntRange(0, 65535), default=None,
              help="Also run the NFQUEUE decider on this queue (`meshctl iptables --nfqueue`), fed with "
                   "the proxy's config.")
@click.option("--decider-metrics-port", type=click.IntRange(1, 65535), default=ports.DECIDER_METRICS,
              show_default=True,
              help="The decider's metrics port on 127.0.0.1 (merged into --metrics-port).")
@click.argument("proxy_args", nargs=-1, type=click.UNPROCESSED)
def agent_command(health_port: int, metrics_port: int, proxy_admin_port: int, proxy_stats_port: int,
                  app_metrics: str | None, proxy_uid: int | None, proxy_gid: int | None,
                  termination_drain_duration: float, restart_initial: float, restart_max: float,
                  restart_reset: float, handover_admin_port: int, handover_stats_port: int,
                  certs: Path | None, decider_queue: int | None, decider_metrics_port: int,
                  proxy_args: tuple[str, ...]) -> None:
    """Run and watch the sidecar proxy (and the NFQUEUE decider); `meshctl proxy` arguments follow `--`.

    SIGHUP hands the proxy over to a new one without dropping a connection; SIGTERM drains it.
    """
    from bus.backoff import Backoff
    from dataplane.agent.agent import Agent, AgentOptions

    if not proxy_args:
        raise click.UsageError("give the proxy's arguments after --, e.g. -- --id pod-1 --config proxy.yaml")
    try:
        backoff = Backoff(initial=restart_initial, cap=restart_max, reset_after=restart_reset)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if {handover_admin_port, handover_stats_port} & {proxy_admin_port, proxy_stats_port}:
        raise click.BadParameter("the hand-over ports must differ from the proxy's admin and stats ports",
                                 param_hint="--handover-admin-port/--handover-stats-port")
    logs.configure()
    agent = Agent(AgentOptions(
        proxy_args=proxy_args, proxy_admin_port=proxy_admin_port, proxy_stats_port=proxy_stats_port,
        health_port=health_port, metrics_port=metrics_port, app_metrics=app_metrics, proxy_uid=proxy_uid,
        proxy_gid=proxy_gid, drain_duration=termination_drain_duration, backoff=backoff,
        handover_admin_port=handover_admin_port, handover_stats_port=handover_stats_port,
        certs=certs, decider_queue=decider_queue, decider_metrics_port=decider_metrics_port))
    sys.exit(agent.run())


@click.command("wait")
@click.option("--health-url", default=f"http://127.0.0.1:{ports.HEALTH}/healthz/ready", show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before giving up.")
@click.option("--interval", type=float, default=0.5, show_default=True, help="Seconds between probes.")
def wait_command(health_url: str, timeout: float, interval: float) -> None:
    """Block until the proxy is ready (exit 0), or exit 1 after --timeout."""
    from dataplane.agent.agent import fetch

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            status, body = fetch(health_url, timeout=max(0.1, min(1.0, left)))
            if status == 200:
                click.echo("proxy ready")
                return
            last = f"{status} {body.strip()}"
        except OSError as exc:
            last = str(exc)
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    click.echo(f"error: the proxy was not ready after {timeout:g}s ({health_url}: {last})", err=True)
    sys.exit(1)
