"""Merge Prometheus text from several sources into one valid exposition (sans-IO).

Prometheus rejects a family declared twice or split into non-adjacent runs, so samples are
grouped under their family's single HELP/TYPE, first source wins. A later source declaring
the same family with another type has those samples dropped (they would not parse), and a
series already seen (same name and labels) is kept once. An undeclared sample joins the family
of its exact name if that is a counter, gauge or untyped, and is its own untyped family if there
is none; one that a typed family claims by suffix (`x_bucket` of histogram `x`) is dropped like
a conflicting type. `promtool check metrics` accepts the result (tests/agent/test_exposition.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created", "_info", "_gcount", "_gsum")
# types whose samples may carry a suffix after the family's name
_SUFFIXED = ("counter", "histogram", "summary", "gaugehistogram", "info")
# types under which an undeclared sample of exactly the family's name parses
_PLAIN = ("counter", "gauge", "untyped", "unknown")


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    samples: dict[str, str] = field(default_factory=dict)  # series key -> line


def _sample_name(line: str) -> str:
    end = len(line)
    for sep in ("{", " ", "\t"):
        i = line.find(sep)
        if i != -1:
            end = min(end, i)
    return line[:end]


def _series_key(line: str) -> str:
    close = line.rfind("}")
    key = line[:close + 1] if "{" in line and close != -1 else _sample_name(line)
    return key.removesuffix("{}")  # `x{} 1` is the series `x 1`


def _belongs(sample: str, family: str, kind: str | None) -> bool:
    """Whether `sample` is one of family's, `kind` being its type (suffixes only for those types)."""
    return sample == family or (kind in _SUFFIXED and any(sample == family + s for s in _SUFFIXES))


def _family_of(sample: str, families: dict[str, _Family]) -> str:
    """The family an undeclared sample belongs to: one of its name, else one whose type gives it
    a suffix (`x_bucket` of histogram `x`), else a new family of its name."""
    if sample in families:
        return sample
    for suffix in _SUFFIXES:
        base = sample.removesuffix(suffix)
        if base != sample and base in families and families[base].type in _SUFFIXED:
            return base
    return sample


def _fits(fam: _Family, declared: str | None, sample: str, family: str) -> bool:
    """Whether a sample, declared `declared` in its own source (None: not at all), parses under
    the merged family's TYPE."""
    if declared is not None:
        return declared == fam.type
    return sample == family and fam.type in _PLAIN


def merge_expositions(texts: Iterable[str]) -> str:
    """Concatenate Prometheus text expositions, one HELP/TYPE per family."""
    families: dict[str, _Family] = {}
    for text in texts:
        declared: dict[str, str] = {}  # family -> type as this source declares it
        current: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    fam = families.setdefault(current, _Family())
                    rest = parts[3] if len(parts) == 4 else ""
                    if parts[1] == "TYPE":
                        declared[current] = rest
                        fam.type = fam.type or rest
                    else:
                        fam.help = fam.help if fam.help is not None else rest
                continue
            name = _sample_name(line)
            kind = declared.get(current) or families[current].type if current is not None else None
            if current is None or not _belongs(name, current, kind):
                current = _family_of(name, families)
            fam = families.setdefault(current, _Family())
            fam.type = fam.type or declared.get(current) or "untyped"
            if not _fits(fam, declared.get(current), name, current):
                continue  # declared differently elsewhere: would not parse under the first TYPE
            fam.samples.setdefault(_series_key(line), line)
    out = []
    for name, fam in families.items():
        if fam.help is not None:
            out.append(f"# HELP {name} {fam.help}")
        if fam.type is not None:
            out.append(f"# TYPE {name} {fam.type}")
        out.extend(fam.samples.values())
    return "\n".join(out) + "\n" if out else ""
