"""meshapi.hosts: pilot and the analyzer resolve and match hosts the same way."""

from __future__ import annotations

import pytest

from meshapi.hosts import fqdn, host_matches


@pytest.mark.parametrize(("host", "namespace", "expected"), [
    ("reviews", "default", "reviews.default.svc.cluster.local"),
    ("reviews", "prod", "reviews.prod.svc.cluster.local"),
    ("reviews.prod", "default", "reviews.prod"),                 # dotted: taken as written
    ("api.example.com", "default", "api.example.com"),
    ("*", "default", "*"),
    ("*.example.com", "default", "*.example.com"),
    ("*foo", "default", "*foo"),                                  # any wildcard stays
])
def test_fqdn(host: str, namespace: str, expected: str) -> None:
    assert fqdn(host, namespace) == expected


def test_fqdn_takes_another_domain() -> None:
    assert fqdn("reviews", "default", "svc.corp.internal") == "reviews.default.svc.corp.internal"


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local", True),
    ("reviews.default.svc.cluster.local", "ratings.default.svc.cluster.local", False),
    ("*", "anything.example.com", True),
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "api.example.org", False),
    ("*.example.com", "*.api.example.com", True),        # both wildcards: the narrower inside the wider
    ("*.api.example.com", "*.example.com", True),
    ("*.example.com", "*.example.org", False),
    ("*", "*", True),
])
def test_host_matches_is_symmetric(a: str, b: str, expected: bool) -> None:
    assert host_matches(a, b) is expected
    assert host_matches(b, a) is expected
