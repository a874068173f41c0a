"""What a proxy worker runs on: the applied config (a Snapshot) and the shared services.

A Snapshot is one config version compiled for the hot path: route matchers, clusters with
their load balancers and outlier state, and the listener tables the accept path reads.
It is immutable once built. Applying a config builds a new Snapshot next to the old one
and replaces `Runtime.snapshot` in one assignment: a request reads the attribute once, when
it starts, so in-flight requests finish on the config they started with, new ones take the
new one, and nothing is dropped (Envoy's listener/route draining, without the draining).

Config that cannot be compiled raises ConfigError with a reason a user can act on; the
proxy NACKs it with that text and the last good Snapshot stays in force.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from dataplane.proxy.accesslog import AccessLog, NullAccessLog
from dataplane.proxy.authz import ALLOW_ALL, Authz, PolicyError, compile_policies
from dataplane.proxy.blackhole import OwnListeners
from dataplane.proxy.cluster import Cluster, build_clusters
from dataplane.proxy.connlimit import ConnectionLimit
from dataplane.proxy.http import pathnorm
from dataplane.proxy.http.options import http_options
from dataplane.proxy.reactor import Reactor
from dataplane.proxy.routing import RouteConfig, build_route_configs
from dataplane.proxy.stats import Stats
from meshapi.config import ProxyConfig

PASSTHROUGH = "PassthroughCluster"


class ConfigError(ValueError):
    """A config this proxy cannot apply; the message is the NACK's error text."""


@dataclass(eq=False)
class Snapshot:
    version: str
    config: ProxyConfig
    routes: dict[str, RouteConfig]
    clusters: dict[str, Cluster]
    outbound: dict[int, list[dict[str, Any]]]   # port -> outbound listeners on it (one per service)
    by_address: dict[tuple[str, int], dict[str, Any]]  # (service VIP, port) -> its listener
    inbound: dict[int, dict[str, Any]]          # workload port -> inbound listener
    outbound_policy: str                        # ALLOW_ANY | REGISTRY_ONLY
    authz: Authz = ALLOW_ALL                    # the inbound side's AuthorizationPolicies
    path_normalization: str = pathnorm.DEFAULT  # meshConfig.pathNormalization (http/pathnorm.py)

    def outbound_listener(self, ip: str, port: int) -> dict[str, Any] | None:
        """The listener for a connection to ip:port: the service owning that VIP, else one that
        takes the whole port (HTTP ones route by Host; TCP ones only when the service has no VIP,
        as Envoy's 0.0.0.0:<port> listeners do). None: not a known service (passthrough or not,
        by the outbound traffic policy)."""
        hit = self.by_address.get((ip, port))
        if hit is not None:
            return hit
        for li in self.outbound.get(port, ()):
            if "route_config" in li or not li.get("addresses"):
                return li
        return None


EMPTY = Snapshot("", {}, {}, {}, {}, {}, {}, "ALLOW_ANY")


def compile_snapshot(config: ProxyConfig, previous: Snapshot | None = None,
                     rng: random.Random | None = None) -> Snapshot:
    """Compile a proxy config (meshapi/config.py) or raise ConfigError."""
    try:
        listeners = config["listeners"]
        routes = build_route_configs(config, previous.routes if previous else None)
        clusters = build_clusters(config, previous.clusters if previous else None, rng)
        outbound: dict[int, list[dict[str, Any]]] = {}
        by_address: dict[tuple[str, int], dict[str, Any]] = {}
        for li in (*listeners["outbound"], *listeners["inbound"]):
            http_options(li.get("http"))  # bad HTTP options are NACKed here, not met per connection
        for li in listeners["outbound"]:
            outbound.setdefault(int(li["port"]), []).append(li)
            for address in li.get("addresses") or ():
                by_address[str(address), int(li["port"])] = li
        inbound = {int(li["port"]): li for li in listeners["inbound"]}
        policy = str(listeners.get("outbound_traffic_policy", "ALLOW_ANY"))
        version = str(config.get("version", ""))
        security = config.get("security") or {}
        authz = compile_policies(security.get("authorization"))
        normalization = security.get("path_normalization", pathnorm.DEFAULT)
        if normalization not in pathnorm.MODES:
            raise ConfigError(f"security.path_normalization must be one of {', '.join(pathnorm.MODES)}, "
                              f"got {normalization!r}")
    except ConfigError:
        raise
    except PolicyError as exc:
        raise ConfigError(str(exc)) from exc
    except (KeyError, TypeError, ValueError, AttributeError, re.error) as exc:
        raise ConfigError(f"cannot compile config: {type(exc).__name__}: {exc}") from exc
    _check_references(config, routes, clusters, outbound, inbound)
    return Snapshot(version, config, routes, clusters, outbound, by_address, inbound, policy, authz,
                    normalization)


def _check_references(config: ProxyConfig, routes: dict[str, RouteConfig], clusters: dict[str, Cluster],
                      outbound: dict[int, list[dict[str, Any]]], inbound: dict[int, dict[str, Any]]) -> None:
    """Every name a listener or route uses must exist: a dangling one would fail requests later."""
    for listeners in outbound.values():
        for li in listeners:
            if "route_config" in li and li["route_config"] not in routes:
                raise ConfigError(f"listener {li['name']} names unknown route config {li['route_config']!r}")
            for tcp in li.get("tcp_routes") or ():
                for target in tcp["clusters"]:
                    if target["name"] not in clusters:
                        raise ConfigError(f"listener {li['name']} routes to unknown cluster "
                                          f"{target['name']!r}")
    for li in inbound.values():
        if li["cluster"] not in clusters:
            raise ConfigError(f"inbound listener {li['name']} names unknown cluster {li['cluster']!r}")
    for name, route_config in (config.get("routes") or {}).items():
        for vhost in route_config["virtual_hosts"]:
            for route in vhost["routes"]:
                for target in route.get("clusters") or ():
                    if target["name"] not in clusters:
                        raise ConfigError(f"route {name}/{vhost['name']}/{route.get('name') or '-'} "
                                          f"names unknown cluster {target['name']!r}")


@dataclass(eq=False)
class Runtime:
    """One worker's world: its reactor, the Snapshot in force, metrics and access log, its own
    listening addresses (never connected to, blackhole.py) and its downstream connection bound."""

    reactor: Reactor
    stats: Stats
    access_log: AccessLog | NullAccessLog
    node_id: str
    snapshot: Snapshot = EMPTY
    rng: random.Random = field(default_factory=random.Random)
    draining: bool = False
    own: OwnListeners = field(default_factory=OwnListeners)
    limit: ConnectionLimit | None = None

    def apply(self, config: ProxyConfig) -> Snapshot:
        """Compile and swap in `config` (raises ConfigError, leaving the old one in force)."""
        snapshot = compile_snapshot(config, self.snapshot, self.rng)
        self.snapshot = snapshot
        return snapshot
