"""The rules, as pure functions: Options (+ the current `iptables-save` text) -> `iptables-restore` text.

Istio's rules (tools/istio-iptables, REDIRECT mode), for the default flags (`-i '*' -b '*'`):

    nat PREROUTING -p tcp -> ISTIO_INBOUND: the sidecar's own ports (15001, 15006, 15020, 15021,
        15090) and -d ports RETURN, the rest -> ISTIO_IN_REDIRECT (REDIRECT to 15006)
    nat OUTPUT -p tcp -> ISTIO_OUTPUT: excluded interfaces and -o ports RETURN; the proxy's (uid or
        gid 1337) loopback connections to anything but 127.0.0.1 -> ISTIO_IN_REDIRECT (an app that
        calls its own service through the mesh: app -> outbound -> inbound -> app); any other
        loopback traffic, the proxy's own traffic, 127.0.0.1 and -x CIDRs RETURN; -q ports and -i
        CIDRs -> ISTIO_REDIRECT (REDIRECT to 15001)

Departures: excluded interfaces RETURN inside ISTIO_INBOUND/ISTIO_OUTPUT instead of in the built-in
chains, so that the built-in chains hold nothing of ours but the jumps; no 15008 tunnel port; and
with `nfqueue` (see policy.py) two more chains:

    mangle OUTPUT -p tcp -> ISTIO_DECIDE: the same exclusions RETURN; a new connection's SYN that
        ISTIO_OUTPUT would redirect goes to NFQUEUE, whose verdict marks it
    mangle ISTIO_KNOWN: the decider's fast path, filled by the decider (`known_text`) from its config:
        the mesh's destinations marked REDIRECT, anything else the policy's verdict, all in the
        kernel; ISTIO_DECIDE jumps there first and RETURNs what got a mark, so the queue sees SYNs
        only before the first config (or when the fast path cannot be written). An install empties
        it (the queue then decides everything, correctly, until the decider's next config)
    nat ISTIO_OUTPUT redirects only what is marked REDIRECT
    filter OUTPUT (mark REJECT) -> ISTIO_DENY: REJECT --reject-with tcp-reset (a refusal in under
        1 ms; a dropped SYN would be retransmitted for seconds)

The text is for `iptables-restore --noflush`: one transaction per table, so traffic never sees half
a rule set. `:CHAIN` lines create our chains or flush them; a jump already in place is kept, any
other jump into our chains is deleted. So running the same options twice changes nothing, changed
options replace the old rules, and `cleanup_text` removes exactly our chains and the jumps into them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from dataplane.init.policy import MARK_MASK, Verdict
from meshapi import ports
from meshapi.identity import PROXY_UID

ALL: Literal["*"] = "*"
T = TypeVar("T")
Ports = tuple[int, ...] | Literal["*"]
Cidrs = tuple[str, ...] | Literal["*"]

TABLES = ("mangle", "nat", "filter")
OWNED = {"mangle": ("ISTIO_DECIDE", "ISTIO_KNOWN"),
         "nat": ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"),
         "filter": ("ISTIO_DENY",)}
NEVER_INBOUND = (ports.OUTBOUND, ports.INBOUND, ports.AGENT_METRICS, ports.HEALTH, ports.PROXY_METRICS)
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
INBOUND_PASSTHROUGH = {4: "127.0.0.6/32", 6: "::6/128"}  # the source Istio's inbound passthrough binds


@dataclass(frozen=True)
class Options:
    """istio-iptables' flags; the defaults are what Istio's injector passes."""

    proxy_port: int = ports.OUTBOUND              # -p
    inbound_port: int = ports.INBOUND             # -z
    proxy_uids: tuple[str, ...] = (str(PROXY_UID),)  # -u
    proxy_gids: tuple[str, ...] = (str(PROXY_UID),)  # -g
    include_cidrs: Cidrs = ALL                    # -i
    exclude_cidrs: tuple[str, ...] = ()           # -x
    include_inbound_ports: Ports = ALL            # -b
    exclude_inbound_ports: tuple[int, ...] = ()   # -d (only with -b '*')
    include_outbound_ports: tuple[int, ...] = ()  # -q
    exclude_outbound_ports: tuple[int, ...] = ()  # -o
    exclude_interfaces: tuple[str, ...] = ()      # -c
    nfqueue: int | None = None                    # --nfqueue
    queue_bypass: bool = False                    # --queue-bypass


@dataclass(frozen=True)
class Table:
    """Our chains in one table and the rules to append, `-A CHAIN ...`; those on built-in chains are jumps."""

    chains: tuple[str, ...]
    rules: tuple[str, ...] = ()


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_ports(text: str) -> tuple[int, ...]:
    """'80,443' -> (80, 443); '' -> ()."""
    ports = []
    for item in _items(text):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise ValueError(f"{item!r} is not a port")
        ports.append(int(item))
    return tuple(ports)


def parse_cidrs(text: str) -> tuple[str, ...]:
    """'10.0.0.0/8,fd00::/8' -> CIDRs normalized as iptables-save prints them (a bare address is a /32)."""
    return tuple(ipaddress.ip_network(item, strict=False).compressed for item in _items(text))


def or_all(parse: Callable[[str], T]) -> Callable[[str], T | Literal["*"]]:
    """`parse`, except that '*' alone means everything."""
    return lambda text: ALL if text.strip() == ALL else parse(text)


def parse_names(text: str) -> tuple[str, ...]:
    """Users, groups or interfaces: 'a,b' -> ('a', 'b')."""
    names = tuple(_items(text))
    for name in names:
        if any(c.isspace() or c in "!\"'" for c in name):
            raise ValueError(f"{name!r} is not a name")
    return names


def _of_family(cidrs: tuple[str, ...], family: int) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c).version == family]


def _outbound_targets(opts: Options, family: int, target: str) -> list[str]:
    """The -q ports and -i CIDRs, each sent to `target` (Istio's order: ports first)."""
    out = [f"-p tcp --dport {port} {target}" for port in opts.include_outbound_ports]
    if opts.include_cidrs == ALL:
        out.append(target)
    else:
        out += [f"-d {cidr} {target}" for cidr in _of_family(opts.include_cidrs, family)]
    return out


def _head_returns(opts: Options) -> list[str]:
    return ([f"-o {name} -j RETURN" for name in opts.exclude_interfaces]
            + [f"-p tcp --dport {port} -j RETURN" for port in opts.exclude_outbound_ports])


def _nat(opts: Options, family: int) -> Table:
    lo = LOOPBACK[family]
    rules = [f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {opts.proxy_port}",
             f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {opts.inbound_port}"]
    inbound = opts.include_inbound_ports
    if inbound:
        rules.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
        rules += [f"-A ISTIO_INBOUND -i {name} -j RETURN" for name in opts.exclude_interfaces]
        never = NEVER_INBOUND + (opts.exclude_inbound_ports if inbound == ALL else ())
        rules += [f"-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN" for port in never]
        if inbound == ALL:
            rules.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        else:
            rules += [f"-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT" for port in inbound]
    rules.append("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
    out = [*_head_returns(opts), f"-o lo -s {INBOUND_PASSTHROUGH[family]} -j RETURN"]
    for kind, ids in (("uid", opts.proxy_uids), ("gid", opts.proxy_gids)):
        for owner in ids:
            out += [f"! -d {lo} -o lo -m owner --{kind}-owner {owner} -j ISTIO_IN_REDIRECT",
                    f"-o lo -m owner ! --{kind}-owner {owner} -j RETURN",
                    f"-m owner --{kind}-owner {owner} -j RETURN"]
    out.append(f"-d {lo} -j RETURN")
    out += [f"-d {cidr} -j RETURN" for cidr in _of_family(opts.exclude_cidrs, family)]
    if opts.nfqueue is not None:
        out.append(f"-m mark ! --mark {Verdict.REDIRECT.mark:#x}/{MARK_MASK:#x} -j RETURN")
    out += _outbound_targets(opts, family, "-j ISTIO_REDIRECT")
    rules += [f"-A ISTIO_OUTPUT {r}" for r in out]
    return Table(OWNED["nat"], tuple(rules))


def _mangle(opts: Options, family: int, queue: int) -> Table:
    """ISTIO_OUTPUT's exclusions again, so that only what nat would redirect is queued."""
    rules = ["-p tcp ! --syn -j RETURN", *_head_returns(opts), "-o lo -j RETURN"]
    rules += [f"-m owner --uid-owner {uid} -j RETURN" for uid in opts.proxy_uids]
    rules += [f"-m owner --gid-owner {gid} -j RETURN" for gid in opts.proxy_gids]
    rules += [f"-d {cidr} -j RETURN" for cidr in _of_family(opts.exclude_cidrs, family)]
    rules += ["-j ISTIO_KNOWN", f"-m mark ! --mark 0x0/{MARK_MASK:#x} -j RETURN"]
    target = f"-m conntrack --ctstate NEW -j NFQUEUE --queue-num {queue}"
    rules += _outbound_targets(opts, family, target + (" --queue-bypass" if opts.queue_bypass else ""))
    return Table(OWNED["mangle"],
                 ("-A OUTPUT -p tcp -j ISTIO_DECIDE", *(f"-A ISTIO_DECIDE {r}" for r in rules)))


def _filter() -> Table:
    reject = f"{Verdict.REJECT.mark:#x}/{MARK_MASK:#x}"
    return Table(OWNED["filter"], (f"-A OUTPUT -m mark --mark {reject} -j ISTIO_DENY",
                                   "-A ISTIO_DENY -p tcp -j REJECT --reject-with tcp-reset"))


def build(opts: Options, family: int) -> dict[str, Table]:
    """The rule set for one address family (4 or 6), table by table."""
    tables = {"nat": _nat(opts, family)}
    if opts.nfqueue is not None:
        tables["mangle"] = _mangle(opts, family, opts.nfqueue)
        tables["filter"] = _filter()
    return tables


def parse_save(text: str) -> dict[str, tuple[set[str], list[tuple[str, str]]]]:
    """`iptables-save` output -> {table: (chain names, [(chain, rule spec)])}."""
    tables: dict[str, tuple[set[str], list[tuple[str, str]]]] = {}
    current: tuple[set[str], list[tuple[str, str]]] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), (set(), []))
        elif current is None:
            continue
        elif line.startswith(":"):
            current[0].add(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            current[1].append((chain, spec))
    return tables


def _target(spec: str) -> str | None:
    words = spec.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def restore_text(desired: Mapping[str, Table], current_save: str = "") -> str:
    """The `iptables-restore --noflush` input that turns `current_save`'s state of our chains into `desired`.

    An empty result means there is nothing to do.
    """
    current = parse_save(current_save)
    out: list[str] = []
    for name in TABLES:
        owned = OWNED[name]
        want = desired.get(name, Table(()))
        chains_now, rules_now = current.get(name, (set(), []))
        stale = [c for c in owned if c in chains_now and c not in want.chains]
        missing = [r for r in want.rules if r.split()[1] not in owned]  # jumps not yet in place
        kept: list[str] = []
        deletes = []
        for chain, spec in rules_now:
            if chain in owned or _target(spec) not in owned:
                continue
            line = f"-A {chain} {spec}"
            if line in missing:
                missing.remove(line)
                kept.append(line)
            else:
                deletes.append(f"-D {chain} {spec}")
        if not (want.chains or stale or deletes):
            continue
        out.append(f"*{name}")
        out += [f":{chain} - [0:0]" for chain in want.chains]
        out += deletes
        out += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
        out += [rule for rule in want.rules if rule not in kept]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def known_text(specs: list[str]) -> str:
    """The `iptables-restore --noflush` input that replaces ISTIO_KNOWN's rules with `specs`
    (policy.DestinationPolicy.fast_path), in one transaction."""
    return "".join(["*mangle\n:ISTIO_KNOWN - [0:0]\n", *(f"-A ISTIO_KNOWN {spec}\n" for spec in specs),
                    "COMMIT\n"])


def install_text(opts: Options, family: int, current_save: str = "") -> str:
    return restore_text(build(opts, family), current_save)


def cleanup_text(current_save: str) -> str:
    return restore_text({}, current_save)
