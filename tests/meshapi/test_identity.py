"""meshapi.identity: the one SPIFFE format every plane writes and reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshapi.identity import SpiffeId, SpiffeIdError, cert_dir, parse_spiffe_id, spiffe_id


@pytest.mark.parametrize(("td", "ns", "sa"), [
    ("cluster.local", "default", "bookinfo-reviews"),
    ("example.org", "prod-1", "web.frontend"),   # a service account may be a DNS-1123 subdomain
    ("td_with-all.chars9", "a", "b"),
])
def test_format_parse_round_trip(td: str, ns: str, sa: str) -> None:
    uri = spiffe_id(td, ns, sa)
    assert uri == f"spiffe://{td}/ns/{ns}/sa/{sa}"
    parsed = parse_spiffe_id(uri)
    assert parsed == SpiffeId(td, ns, sa)
    assert str(parsed) == uri


@pytest.mark.parametrize(("uri", "names"), [
    ("https://cluster.local/ns/default/sa/web", "not a spiffe:// URI"),
    ("spiffe://Cluster.Local/ns/default/sa/web", "trust domain 'Cluster.Local'"),
    ("spiffe:///ns/default/sa/web", "trust domain ''"),
    ("spiffe://cluster.local/ns/default/sa", "/ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/default/sa/web/extra", "/ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/namespace/default/sa/web", "/ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/Default/sa/web", "namespace 'Default'"),
    ("spiffe://cluster.local/ns//sa/web", "namespace ''"),
    ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/web", "is not a DNS-1123 label"),
    ("spiffe://cluster.local/ns/default/sa/web..x", "service account 'web..x'"),
    ("spiffe://cluster.local/ns/default/sa/-web", "service account '-web'"),
])
def test_malformed_ids_are_refused_naming_the_bad_part(uri: str, names: str) -> None:
    with pytest.raises(SpiffeIdError) as err:
        parse_spiffe_id(uri)
    assert names in str(err.value)
    assert isinstance(err.value, ValueError)


def test_cert_dir_is_the_node_agents_layout() -> None:
    assert cert_dir(Path("/run/zmesh"), "reviews-v1.default") == Path("/run/zmesh/certs/reviews-v1.default")
