"""The rule text, sans-IO: Istio's default flags exactly, then what each option changes."""

from __future__ import annotations

import pytest

from dataplane.init import rules
from dataplane.init.rules import ALL, Options, Table, build, cleanup_text, install_text, restore_text

DEFAULT_V4 = """\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15001 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15006 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


def output_rules(opts: Options, family: int = 4) -> list[str]:
    """ISTIO_OUTPUT's rules after the fixed owner/loopback block (what the outbound options change)."""
    specs = [r.removeprefix("-A ISTIO_OUTPUT ") for r in build(opts, family)["nat"].rules
             if r.startswith("-A ISTIO_OUTPUT ")]
    return specs[specs.index("-d 127.0.0.1/32 -j RETURN" if family == 4 else "-d ::1/128 -j RETURN") + 1:]


def chain(opts: Options, table: str, name: str, family: int = 4) -> list[str]:
    prefix = f"-A {name} "
    return [r.removeprefix(prefix) for r in build(opts, family)[table].rules if r.startswith(prefix)]


def test_default_flags_are_istios_rules() -> None:
    assert install_text(Options(), 4) == DEFAULT_V4


def test_ipv6_uses_ipv6_loopback_and_passthrough_source() -> None:
    expected = (DEFAULT_V4.replace("127.0.0.1/32", "::1/128").replace("127.0.0.6/32", "::6/128"))
    assert install_text(Options(), 6) == expected


def test_ports_and_owners() -> None:
    text = install_text(Options(proxy_port=16001, inbound_port=16006, proxy_uids=("101", "102"),
                                proxy_gids=("201",)), 4)
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001\n" in text
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006\n" in text
    owners = [line for line in text.splitlines() if "-owner" in line]
    assert owners == [
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 101 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 101 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 101 -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 102 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 102 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 102 -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 201 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 201 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 201 -j RETURN",
    ]


def test_include_cidrs_split_by_family() -> None:
    opts = Options(include_cidrs=("10.0.0.0/8", "fd00::/8", "192.168.0.0/16"))
    assert output_rules(opts, 4) == ["-d 10.0.0.0/8 -j ISTIO_REDIRECT", "-d 192.168.0.0/16 -j ISTIO_REDIRECT"]
    assert output_rules(opts, 6) == ["-d fd00::/8 -j ISTIO_REDIRECT"]
    assert output_rules(Options(include_cidrs=()), 4) == []


def test_exclude_cidrs_return_before_the_redirect() -> None:
    opts = Options(exclude_cidrs=("10.96.0.0/12", "fd00::/8"))
    assert output_rules(opts, 4) == ["-d 10.96.0.0/12 -j RETURN", "-j ISTIO_REDIRECT"]
    assert output_rules(opts, 6) == ["-d fd00::/8 -j RETURN", "-j ISTIO_REDIRECT"]


def test_include_outbound_ports_come_before_the_cidrs() -> None:
    opts = Options(include_cidrs=("10.0.0.0/8",), include_outbound_ports=(32000, 31000))
    assert output_rules(opts) == ["-p tcp --dport 32000 -j ISTIO_REDIRECT",
                                  "-p tcp --dport 31000 -j ISTIO_REDIRECT", "-d 10.0.0.0/8 -j ISTIO_REDIRECT"]


def test_exclude_outbound_ports_and_interfaces_return_first() -> None:
    opts = Options(exclude_outbound_ports=(22, 443), exclude_interfaces=("eth1",))
    assert chain(opts, "nat", "ISTIO_OUTPUT")[:4] == [
        "-o eth1 -j RETURN", "-p tcp --dport 22 -j RETURN", "-p tcp --dport 443 -j RETURN",
        "-o lo -s 127.0.0.6/32 -j RETURN"]
    assert chain(opts, "nat", "ISTIO_INBOUND")[0] == "-i eth1 -j RETURN"


def test_inbound_ports() -> None:
    sidecar = [f"-p tcp --dport {p} -j RETURN" for p in (15001, 15006, 15020, 15021, 15090)]
    wildcard = Options(exclude_inbound_ports=(22, 8080))
    assert chain(wildcard, "nat", "ISTIO_INBOUND") == [
        *sidecar, "-p tcp --dport 22 -j RETURN", "-p tcp --dport 8080 -j RETURN",
        "-p tcp -j ISTIO_IN_REDIRECT"]
    listed = Options(include_inbound_ports=(4000, 5000), exclude_inbound_ports=(22,))  # -d needs -b '*'
    assert chain(listed, "nat", "ISTIO_INBOUND") == [
        *sidecar, "-p tcp --dport 4000 -j ISTIO_IN_REDIRECT", "-p tcp --dport 5000 -j ISTIO_IN_REDIRECT"]
    none = build(Options(include_inbound_ports=()), 4)["nat"]
    assert not [r for r in none.rules if "PREROUTING" in r or "ISTIO_INBOUND " in r]
    assert "ISTIO_INBOUND" in none.chains  # kept, so that the chain set never depends on the flags


def test_nfqueue_adds_the_decider_chains_and_gates_the_redirect() -> None:
    opts = Options(nfqueue=7, exclude_cidrs=("10.96.0.0/12",), exclude_outbound_ports=(22,),
                   exclude_interfaces=("eth1",), include_outbound_ports=(9000,))
    queue = "-m conntrack --ctstate NEW -j NFQUEUE --queue-num 7"
    assert build(opts, 4)["mangle"].rules == (
        "-A OUTPUT -p tcp -j ISTIO_DECIDE",
        "-A ISTIO_DECIDE -p tcp ! --syn -j RETURN",
        "-A ISTIO_DECIDE -o eth1 -j RETURN",
        "-A ISTIO_DECIDE -p tcp --dport 22 -j RETURN",
        "-A ISTIO_DECIDE -o lo -j RETURN",
        "-A ISTIO_DECIDE -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_DECIDE -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_DECIDE -d 10.96.0.0/12 -j RETURN",
        "-A ISTIO_DECIDE -j ISTIO_KNOWN",  # the decider's fast path marks the mesh's destinations
        "-A ISTIO_DECIDE -m mark ! --mark 0x0/0x300000 -j RETURN",  # it gave a verdict
        f"-A ISTIO_DECIDE -p tcp --dport 9000 {queue}",
        f"-A ISTIO_DECIDE {queue}",
    )
    assert output_rules(opts) == ["-d 10.96.0.0/12 -j RETURN", "-m mark ! --mark 0x100000/0x300000 -j RETURN",
                                  "-p tcp --dport 9000 -j ISTIO_REDIRECT", "-j ISTIO_REDIRECT"]
    assert build(opts, 4)["filter"] == Table(("ISTIO_DENY",), (
        "-A OUTPUT -m mark --mark 0x300000/0x300000 -j ISTIO_DENY",
        "-A ISTIO_DENY -p tcp -j REJECT --reject-with tcp-reset"))
    bypass = build(Options(nfqueue=7, queue_bypass=True), 4)["mangle"].rules
    assert bypass[-1] == f"-A ISTIO_DECIDE {queue} --queue-bypass"
    assert set(build(Options(), 4)) == {"nat"}
    assert build(opts, 4)["mangle"].chains == ("ISTIO_DECIDE", "ISTIO_KNOWN")


def test_known_text_replaces_the_fast_path_chain_in_one_transaction() -> None:
    assert rules.known_text(["-d 10.96.0.10/32 -j MARK --set-xmark 0x100000/0x300000"]) == (
        "*mangle\n:ISTIO_KNOWN - [0:0]\n"
        "-A ISTIO_KNOWN -d 10.96.0.10/32 -j MARK --set-xmark 0x100000/0x300000\nCOMMIT\n")
    assert rules.known_text([]) == "*mangle\n:ISTIO_KNOWN - [0:0]\nCOMMIT\n"


SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [12:720]
:ISTIO_DECIDE - [0:0]
-A OUTPUT -p tcp -j ISTIO_DECIDE
-A ISTIO_DECIDE -m conntrack --ctstate NEW -j NFQUEUE --queue-num 7
COMMIT
*filter
:OUTPUT ACCEPT [0:0]
:ISTIO_DENY - [0:0]
-A OUTPUT -m mark --mark 0x300000/0x300000 -j ISTIO_DENY
-A ISTIO_DENY -p tcp -j REJECT --reject-with tcp-reset
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OUTPUT -d 10.9.0.0/16 -j RETURN
-A OUTPUT -j ISTIO_OUTPUT
-A KUBE-SERVICES -m comment --comment "kube: keep me" -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


MANGLE_CLEANUP = "*mangle\n-D OUTPUT -p tcp -j ISTIO_DECIDE\n-F ISTIO_DECIDE\n-X ISTIO_DECIDE\nCOMMIT\n"
FILTER_CLEANUP = ("*filter\n-D OUTPUT -m mark --mark 0x300000/0x300000 -j ISTIO_DENY\n-F ISTIO_DENY\n"
                  "-X ISTIO_DENY\nCOMMIT\n")


def test_a_second_install_keeps_the_jumps_in_place_and_refills_our_chains() -> None:
    text = install_text(Options(), 4, SAVED)
    lines = text.splitlines()
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" not in lines  # already there: kept where it is
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" not in lines
    assert "-D OUTPUT -j ISTIO_OUTPUT" in lines  # a different jump into our chain (an old install)
    assert ":ISTIO_OUTPUT - [0:0]" in lines and "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in lines
    assert not any("KUBE" in line or "10.9.0.0" in line for line in lines)  # foreign rules untouched
    # no --nfqueue any more: the decider's chains and their jumps go
    assert text.startswith(MANGLE_CLEANUP)
    assert text.endswith(FILTER_CLEANUP)


def test_install_over_identical_state_only_refills() -> None:
    opts = Options(nfqueue=7)
    saved = "".join(f"*{name}\n" + "".join(f":{c} - [0:0]\n" for c in table.chains)
                    + "".join(r + "\n" for r in table.rules) + "COMMIT\n"
                    for name, table in build(opts, 4).items())
    text = install_text(opts, 4, saved)
    assert not [line for line in text.splitlines() if line.split()[0] in ("-D", "-F", "-X")]
    builtin = (["-A", "OUTPUT"], ["-A", "PREROUTING"])
    assert not [line for line in text.splitlines() if line.split()[:2] in builtin]


def test_cleanup_removes_exactly_our_chains_and_jumps() -> None:
    assert cleanup_text(SAVED) == MANGLE_CLEANUP + (
        "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-D OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        "-D OUTPUT -j ISTIO_OUTPUT\n"
        "-F ISTIO_INBOUND\n-F ISTIO_REDIRECT\n-F ISTIO_IN_REDIRECT\n-F ISTIO_OUTPUT\n"
        "-X ISTIO_INBOUND\n-X ISTIO_REDIRECT\n-X ISTIO_IN_REDIRECT\n-X ISTIO_OUTPUT\nCOMMIT\n"
    ) + FILTER_CLEANUP
    assert cleanup_text("") == ""
    assert restore_text({}, "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n") == ""


def test_parsers() -> None:
    assert rules.parse_ports(" 80, 443,") == (80, 443)
    assert rules.parse_ports("") == ()
    assert rules.or_all(rules.parse_ports)(" * ") == ALL
    assert rules.parse_cidrs("10.1.2.3/8,fd00::1,1.2.3.4") == ("10.0.0.0/8", "fd00::1/128", "1.2.3.4/32")
    assert rules.parse_names("1337,istio-proxy") == ("1337", "istio-proxy")
    for bad in ("0", "65536", "http", "*,80"):
        with pytest.raises(ValueError):
            rules.or_all(rules.parse_ports)(bad)
    for bad in ("10.0.0.0/33", "*", "example.com"):
        with pytest.raises(ValueError):
            rules.parse_cidrs(bad)
    with pytest.raises(ValueError):
        rules.parse_names("eth0 ! -j ACCEPT")
