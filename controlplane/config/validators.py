"""Value checks Istio applies to many kinds: durations, hosts, ports, labels, regexes, CIDRs."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from controlplane.config.schema import Int, Report, Str
from controlplane.config.yamlload import Path

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def parse_duration(text: str) -> float | None:
    """Go/protobuf-style duration ("1.5s", "100ms", "1h30m") in seconds, or None if malformed."""
    if not isinstance(text, str) or not text:
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total


def check_duration(value: Any, path: Path, report: Report, minimum: float = 0.001) -> None:
    seconds = parse_duration(value)
    if seconds is None:
        report.error(path, f"invalid duration {value!r} (use e.g. 10s, 500ms, 1m)")
    elif seconds < minimum:
        report.error(path, f"duration {value!r} is below the minimum of {minimum * 1000:g}ms")


def Duration(minimum: float = 0.001) -> Str:
    return Str(checks=(lambda v, p, r: check_duration(v, p, r, minimum),))


def check_dns1123_label(value: str, path: Path, report: Report, what: str = "name") -> None:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        report.error(path, f"{what} {value!r} must be a DNS-1123 label (lowercase letters, digits, '-')")


def check_dns1123_subdomain(value: str, path: Path, report: Report, what: str = "name") -> None:
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in value.split(".")):
        report.error(path, f"{what} {value!r} must be a DNS-1123 subdomain")


def check_host(value: Any, path: Path, report: Report, allow_wildcard: bool = True,
               allow_short: bool = True) -> None:
    """An FQDN or short name, optionally with one leading `*` label (Istio's host rules)."""
    if not isinstance(value, str) or not value:
        report.error(path, "host must not be empty")
        return
    if value == "*":
        if not allow_wildcard:
            report.error(path, "wildcard host '*' is not allowed here")
        return
    host = value
    if host.startswith("*"):
        if not allow_wildcard:
            report.error(path, f"wildcard host {value!r} is not allowed here")
            return
        if not host.startswith("*."):
            report.error(path, f"invalid wildcard host {value!r}: '*' must be a whole leading label")
            return
        host = host[2:]
    if len(host) > 255:
        report.error(path, f"host {value!r} is longer than 255 characters")
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    if not allow_short and len(labels) < 2:
        report.error(path, f"host {value!r} must be fully qualified")
        return
    for label in labels:
        if "*" in label:
            report.error(path, f"invalid host {value!r}: '*' is only allowed as the first label")
            return
        if len(label) > 63 or not _HOST_LABEL.fullmatch(label):
            report.error(path, f"invalid host {value!r}: label {label!r} is not a valid DNS label")
            return


def Host(allow_wildcard: bool = True) -> Str:
    return Str(checks=(lambda v, p, r: check_host(v, p, r, allow_wildcard),))


def Port() -> Int:
    return Int(1, 65535)


def check_label_key(key: str, path: Path, report: Report) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix:
        check_dns1123_subdomain(prefix, path, report, "label prefix")
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        report.error(path, f"invalid label key {key!r}: name must be 63 characters or fewer, "
                           "alphanumeric with '-', '_' or '.' inside")


def check_label_value(value: Any, path: Path, report: Report) -> None:
    if not isinstance(value, str):
        report.error(path, f"label value must be a string, got {type(value).__name__}")
        return
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        report.error(path, f"invalid label value {value!r}: 63 characters or fewer, "
                           "alphanumeric with '-', '_' or '.' inside")


def Labels():
    from controlplane.config.schema import Map

    return Map(Str(checks=(check_label_value,)), key=Str(checks=(check_label_key,)))


# RE2 rejects backreferences and lookaround; Python's `re` accepts them, so refuse them first.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?[=!<]|\(\?P=|\(\?>|\\[zZ](?![a-z])")


def check_regex(value: Any, path: Path, report: Report) -> None:
    if not isinstance(value, str):
        report.error(path, "regex must be a string")
        return
    bad = _NOT_RE2.search(value)
    if bad:
        report.error(path, f"regex {value!r} uses {bad.group(0)!r}, which RE2 does not support",
                     code=("IST0122", "InvalidRegexp"))
        return
    try:
        re.compile(value)
    except re.error as exc:
        report.error(path, f"invalid regex {value!r}: {exc}", code=("IST0122", "InvalidRegexp"))


def check_cidr(value: Any, path: Path, report: Report) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        report.error(path, f"{value!r} is not an IP address or CIDR block")


def check_ip(value: Any, path: Path, report: Report) -> None:
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError):
        report.error(path, f"{value!r} is not an IP address")
