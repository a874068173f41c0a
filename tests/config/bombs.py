"""Hostile YAML built in the tests (nothing large sits in the repository)."""

from __future__ import annotations


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: `levels` anchors, each a list of `width` aliases of the one before, so the
    last expands to width**levels strings (9x9: 387 million) from a few hundred bytes. Wrapped
    in a resource's envelope, as the report's file was."""
    lines = ["apiVersion: networking.istio.io/v1", "kind: VirtualService", "metadata: {name: bomb}",
             "spec:", "  hosts: [bomb]", "  laughs:",
             "    l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def at(text: str, line: int, column: int) -> str:
    """The text from a 1-based (line, column) on, to the end of that line."""
    return text.splitlines()[line - 1][column - 1:]


def deep_nesting(depth: int, flow: bool = True) -> str:
    """`depth` lists, each the only item of the one before: `[[[...]]]` (flow) or one `-` a line,
    each indented under the last (block)."""
    if flow:
        return "[" * depth + "]" * depth + "\n"
    return "".join("  " * i + "-\n" for i in range(depth - 1)) + "  " * (depth - 1) + "[]\n"
