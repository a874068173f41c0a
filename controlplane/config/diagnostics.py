"""Diagnostics: every config problem as one record a person can act on.

Each carries Istio's message code and name where one applies (so users can search
them), the file and line, the resource, and the field path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ERROR = "Error"
WARNING = "Warning"
INFO = "Info"


@dataclass(frozen=True, order=True)
class Diagnostic:
    level: str
    code: str            # e.g. IST0106
    name: str            # e.g. SchemaValidationError
    message: str
    file: str = ""
    line: int = 0
    kind: str = ""
    namespace: str = ""
    resource: str = ""   # the resource's name
    path: str = ""       # e.g. spec.http[0].route[1].weight
    column: int = 0      # where the line alone is not enough (a YAML alias)

    def origin(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else self.file
        if where and self.line and self.column:
            where += f":{self.column}"
        who = f"{self.kind} {self.namespace}/{self.resource}" if self.kind else ""
        return " ".join(p for p in (who, where) if p)

    def __str__(self) -> str:
        origin = self.origin()
        path = f"{self.path}: " if self.path else ""
        return f"{self.level} [{self.code}] ({origin}) {path}{self.message}" if origin else \
            f"{self.level} [{self.code}] {path}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(Exception):
    """Raised where one diagnostic stops the work (a file that is not YAML at all)."""

    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(str(diagnostic))
        self.diagnostic = diagnostic


def format_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out
