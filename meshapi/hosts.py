"""Host names as Istio's config uses them: short names resolved in a namespace, wildcards.

Pilot (translation) and the config analyzer must agree on both, or `istioctl analyze` would
pass config that pilot reads differently.
"""

from __future__ import annotations

DEFAULT_DOMAIN = "svc.cluster.local"


def fqdn(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """Istio's short-name resolution: `reviews` in namespace `default` is
    reviews.default.svc.cluster.local; wildcards and names with dots are taken as written."""
    if host.startswith("*") or "." in host:
        return host
    return f"{host}.{namespace}.{domain}"


def host_matches(a: str, b: str) -> bool:
    """Istio's host.Name.Matches: either side may be a wildcard (`*`, `*.example.com`)."""
    if a.startswith("*") and b.startswith("*"):
        return b[1:].endswith(a[1:]) if len(a) < len(b) else a[1:].endswith(b[1:])
    if a.startswith("*"):
        return b.endswith(a[1:])
    if b.startswith("*"):
        return a.endswith(b[1:])
    return a == b
