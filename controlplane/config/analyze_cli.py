"""`meshctl analyze`: istioctl analyze for config files, before they reach the mesh.

Messages go to stdout (machine-readable with -o json|yaml); the summary and the
all-clear go to stderr, as istioctl does, so piping the output stays clean. The exit
code tells CI how bad it is: errors and warnings differ.
"""

from __future__ import annotations

import json
from collections import Counter

import click
import yaml

from controlplane.config.analyze import analyze
from controlplane.config.diagnostics import ERROR, WARNING, Diagnostic
from controlplane.config.validate import load_paths, yaml_files

EXIT_WARNINGS = 79  # istioctl's "analyzers found issues"
EXIT_ERRORS = 80
TABLE_COLUMNS = ("LEVEL", "CODE", "NAME", "RESOURCE", "LOCATION", "MESSAGE")


def exit_code(messages: list[Diagnostic]) -> int:
    """0 when nothing worse than Info was found; else by the worst level."""
    levels = {m.level for m in messages}
    return EXIT_ERRORS if ERROR in levels else EXIT_WARNINGS if WARNING in levels else 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(messages: list[Diagnostic], files: int) -> str:
    counts = Counter(m.level for m in messages)
    found = ", ".join(_plural(counts[level], word) for level, word in
                      ((ERROR, "error"), (WARNING, "warning"), ("Info", "info message")))
    return f"Analyzed {_plural(files, 'file')}: {found}."


def table(messages: list[Diagnostic]) -> str:
    rows = [TABLE_COLUMNS] + [
        (m.level, m.code, m.name, f"{m.kind} {m.namespace}/{m.resource}" if m.kind else "",
         f"{m.file}:{m.line}" if m.line else m.file, f"{m.path}: {m.message}" if m.path else m.message)
        for m in messages]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
                     for row in rows)


def all_clear(paths: tuple[str, ...]) -> str:
    """istioctl's words when nothing was found, so scripts and people recognise them."""
    if len(paths) == 1:
        return f"\u2714 No validation issues found when analyzing {paths[0]}."
    return "\u2714 No validation issues found when analyzing:\n" + "\n".join(f"  - {p}" for p in paths)


@click.command("analyze")
@click.option("-f", "--filename", "paths", multiple=True, type=click.Path(exists=True),
              help="A YAML file or a directory of them (repeatable).")
@click.option("-o", "--output", type=click.Choice(["log", "json", "yaml", "table"]), default="log",
              show_default=True, help="How to print the messages.")
@click.pass_context
def analyze_command(ctx: click.Context, paths: tuple[str, ...], output: str) -> None:
    """Check config files against each other: references, conflicts, unused rules (Istio's codes).

    Exits 0 when clean, 79 when the worst message is a warning, 80 on errors.
    """
    if not paths:
        raise click.UsageError("nothing to analyze: pass -f FILE|DIR")
    files = list({f.resolve(): f for f in yaml_files(list(paths))}.values())  # each file once, as named
    if not files:
        raise click.UsageError(f"no .yaml or .yml files in {', '.join(paths)}")
    loaded = load_paths(files)
    messages = analyze(loaded.resources, loaded.diagnostics)
    if output == "json":
        click.echo(json.dumps([m.to_dict() for m in messages], indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump([m.to_dict() for m in messages], sort_keys=False), nl=False)
    elif messages:
        click.echo(table(messages) if output == "table" else "\n".join(map(str, messages)))
    if not messages:
        click.echo(all_clear(paths), err=True)
    elif output in ("log", "table"):
        click.echo(summary(messages, len(files)), err=True)
    ctx.exit(exit_code(messages))
