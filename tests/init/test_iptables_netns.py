"""`python -m dataplane.init iptables` for real, inside a pod namespace (conftest.py has the topology
and the `sidecar` cast: the app, the transparent proxy on 15001, the inbound recorder on 15006)."""

from __future__ import annotations

from dataplane.init.rules import Options, install_text
from tests.conftest import unavailable
from tests.init.conftest import AP, OTHER_IP, REMOTE_IP, REMOTE_IP6, RP, XAP, XP, Sidecar, Topology


def test_outbound_goes_through_the_proxy_which_sees_the_original_destination(sidecar: Sidecar,
                                                                              clean: Topology) -> None:
    assert sidecar.outbound(REMOTE_IP, RP) == "direct"  # no rules yet
    clean.init("--no-ipv6")
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"
    assert sidecar.outbound(OTHER_IP, RP) == "proxy"
    # the proxy's own connections (uid/gid 1337) are not sent back into it
    assert sidecar.outbound(REMOTE_IP, RP, as_proxy=True) == "direct"


def test_excluded_and_included_destinations(sidecar: Sidecar, clean: Topology) -> None:
    clean.init("--no-ipv6", "-x", f"{OTHER_IP}/32", "-o", str(XP))
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"
    assert sidecar.outbound(OTHER_IP, RP) == "direct"  # -x
    assert sidecar.outbound(REMOTE_IP, XP) == "direct"  # -o
    clean.init("--no-ipv6", "-i", f"{OTHER_IP}/32")  # an update in place: only 10.77.0.3 now
    assert sidecar.outbound(REMOTE_IP, RP) == "direct"
    assert sidecar.outbound(OTHER_IP, RP) == "proxy"
    clean.init("--no-ipv6", "-i", "", "-q", str(XP))  # no CIDR, one port
    assert sidecar.outbound(REMOTE_IP, RP) == "direct"
    assert sidecar.outbound(REMOTE_IP, XP) == "proxy"
    clean.init("--no-ipv6", "-c", "zi0")  # everything, except what leaves through zi0
    assert sidecar.outbound(REMOTE_IP, RP) == "direct"
    assert sidecar.inbound(AP, ns=clean.remote) == "app"


def test_inbound_goes_to_15006_except_excluded_and_sidecar_ports(sidecar: Sidecar, clean: Topology) -> None:
    remote = {"ns": clean.remote}
    assert sidecar.inbound(AP, **remote) == "app"
    clean.init("--no-ipv6", "-d", str(XAP))
    assert sidecar.inbound(AP, **remote) == "inbound"
    assert sidecar.inbound(XAP, **remote) == "app"  # -d
    assert sidecar.inbound(15021, **remote) == "app"  # the sidecar's own ports are never redirected
    # the proxy calling its own pod's address reaches the inbound side (app -> outbound -> inbound -> app)
    assert sidecar.inbound(AP, as_proxy=True) == "inbound"
    assert sidecar.inbound(AP) == "app"  # the app calling itself is left alone
    clean.init("--no-ipv6", "-b", str(XAP))
    assert sidecar.inbound(AP, **remote) == "app"
    assert sidecar.inbound(XAP, **remote) == "inbound"


def test_install_is_idempotent_and_cleanup_restores_the_state(sidecar: Sidecar, clean: Topology) -> None:
    ipv6 = () if clean.ipv6 else ("--no-ipv6",)
    flags = ["-x", "10.96.0.0/12,fd00:96::/64", "-o", "22", "-q", "9000", "-b", "9080,9081", "-c", "zi9",
             "--nfqueue", "3", "--queue-bypass", *ipv6]
    before = {f: clean.save(f) for f in clean.families()}
    clean.init(*flags)
    first = {f: clean.save(f) for f in clean.families()}
    for family in clean.families():
        assert first[family] != before[family]
        assert "ISTIO_DECIDE" in first[family] and "ISTIO_DENY" in first[family]
    assert "-A OUTPUT -d 10.99.0.0/16 -j FOREIGN" in first[4]  # another tool's rules stay
    clean.init(*flags)
    assert {f: clean.save(f) for f in clean.families()} == first
    clean.init(*ipv6)  # other options replace the rules (the decider's chains go) ...
    assert "ISTIO_DECIDE" not in clean.save(4)
    clean.init(*flags)  # ... and back again gives the same state
    assert {f: clean.save(f) for f in clean.families()} == first
    clean.init("--cleanup", *ipv6)
    assert {f: clean.save(f) for f in clean.families()} == before
    clean.init("--cleanup", *ipv6)  # nothing left to remove: a no-op
    assert {f: clean.save(f) for f in clean.families()} == before


def test_dry_run_prints_the_restore_input_and_changes_nothing(sidecar: Sidecar, clean: Topology) -> None:
    before = {f: clean.save(f) for f in clean.families()}
    out = clean.init("--dry-run", *(() if clean.ipv6 else ("--no-ipv6",))).stdout
    expected = "# iptables-restore -w 5 --noflush\n" + install_text(Options(), 4)
    if clean.ipv6:
        expected += "# ip6tables-restore -w 5 --noflush\n" + install_text(Options(), 6)
    assert out == expected
    assert {f: clean.save(f) for f in clean.families()} == before
    clean.init("--no-ipv6")
    installed = clean.save(4)
    again = clean.init("--dry-run", "--no-ipv6").stdout
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" not in again  # it read the state: the jump is in place
    assert "-X ISTIO_OUTPUT" in clean.init("--dry-run", "--cleanup", "--no-ipv6").stdout
    assert clean.save(4) == installed


def test_ipv6(sidecar: Sidecar, clean: Topology) -> None:
    if not clean.ipv6:
        unavailable("no IPv6 in the namespaces here (the address or ip6tables-restore failed)")
    assert sidecar.outbound(REMOTE_IP6, RP) == "direct"
    clean.init("-x", f"{OTHER_IP}/32")
    assert sidecar.outbound(REMOTE_IP6, RP) == "proxy"
    assert sidecar.outbound(REMOTE_IP6, RP, as_proxy=True) == "direct"
    clean.init("-x", f"{REMOTE_IP6}/128")
    assert sidecar.outbound(REMOTE_IP6, RP) == "direct"
    assert sidecar.outbound(REMOTE_IP, RP) == "proxy"
