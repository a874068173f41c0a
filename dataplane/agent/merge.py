"""Merge Prometheus text from several sources into one valid exposition (sans-IO).

Prometheus rejects a family declared twice or split into non-adjacent runs, so samples are
grouped under their family's single HELP/TYPE, first source wins. A later source declaring
the same family with another type has those samples dropped (they would not parse), and a
series already seen (same name and labels) is kept once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created", "_info", "_gcount", "_gsum")


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
    return line[:close + 1] if "{" in line and close != -1 else _sample_name(line)


def _belongs(sample: str, family: str | None) -> bool:
    return family is not None and (sample == family or any(sample == family + s for s in _SUFFIXES))


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
            if not _belongs(name, current):
                current = name
            fam = families.setdefault(current, _Family())
            if fam.type is not None and declared.get(current, "untyped") != fam.type:
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
