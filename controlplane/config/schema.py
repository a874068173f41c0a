"""A small schema language for Istio's config: types, known fields, and semantic checks.

A schema walks a value with its path; every problem becomes a Diagnostic naming the
path (`spec.http[0].route[1].weight`) and the line it is on. Unknown fields are
errors, as they are for Istio's CRDs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.config.diagnostics import ERROR, WARNING, Diagnostic, format_path
from controlplane.config.yamlload import Path

SCHEMA = ("IST0106", "SchemaValidationError")


class Report:
    """Collects diagnostics for one resource, locating each path in its document."""

    def __init__(self, locate: Callable[[Path], int], file: str = "", kind: str = "",
                 namespace: str = "", name: str = "") -> None:
        self._locate = locate
        self.context = {"file": file, "kind": kind, "namespace": namespace, "resource": name}
        self.diagnostics: list[Diagnostic] = []

    def add(self, level: str, path: Path, message: str, code: tuple[str, str] = SCHEMA) -> None:
        self.diagnostics.append(Diagnostic(level, code[0], code[1], message, line=self._locate(path),
                                           path=format_path(path), **self.context))

    def error(self, path: Path, message: str, code: tuple[str, str] = SCHEMA) -> None:
        self.add(ERROR, path, message, code)

    def warning(self, path: Path, message: str, code: tuple[str, str] = SCHEMA) -> None:
        self.add(WARNING, path, message, code)


Check = Callable[[Any, Path, Report], None]


class Type:
    checks: tuple[Check, ...] = ()

    def validate(self, value: Any, path: Path, report: Report) -> bool:
        """Check `value`; returns False when its type was wrong (so semantic checks are skipped)."""
        if not self.check_type(value, path, report):
            return False
        for check in self.checks:
            check(value, path, report)
        return True

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        raise NotImplementedError


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


@dataclass
class Str(Type):
    enum: Iterable[str] | None = None
    pattern: str | None = None
    checks: tuple[Check, ...] = ()
    allow_empty: bool = True

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if not isinstance(value, str):
            report.error(path, f"expected a string, got {_type_name(value)}")
            return False
        if self.enum is not None and value not in self.enum:
            report.error(path, f"{value!r} is not one of {', '.join(sorted(self.enum))}")
            return False
        if not self.allow_empty and not value:
            report.error(path, "must not be empty")
            return False
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            report.error(path, f"{value!r} does not match {self.pattern}")
            return False
        return True


@dataclass
class Int(Type):
    lo: int | None = None
    hi: int | None = None
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            report.error(path, f"expected an integer, got {_type_name(value)}")
            return False
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            lo = "" if self.lo is None else self.lo
            hi = "" if self.hi is None else self.hi
            report.error(path, f"{value} is out of range [{lo}, {hi}]")
            return False
        return True


@dataclass
class Num(Type):
    lo: float | None = None
    hi: float | None = None
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            report.error(path, f"expected a number, got {_type_name(value)}")
            return False
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            report.error(path, f"{value} is out of range [{self.lo}, {self.hi}]")
            return False
        return True


@dataclass
class Bool(Type):
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if not isinstance(value, bool):
            report.error(path, f"expected a boolean, got {_type_name(value)}")
            return False
        return True


@dataclass
class AnyValue(Type):
    """Fields we carry but do not interpret (Kubernetes' own, mostly)."""

    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        return True


@dataclass
class List(Type):
    item: Type
    min_items: int = 0
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if not isinstance(value, list):
            report.error(path, f"expected a list, got {_type_name(value)}")
            return False
        if len(value) < self.min_items:
            report.error(path, f"needs at least {self.min_items} item(s)")
        for i, item in enumerate(value):
            self.item.validate(item, (*path, i), report)
        return True


@dataclass
class Map(Type):
    value: Type
    key: Type = field(default_factory=Str)
    checks: tuple[Check, ...] = ()

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if not isinstance(value, dict):
            report.error(path, f"expected a map, got {_type_name(value)}")
            return False
        for k, v in value.items():
            if self.key.check_type(k, (*path, str(k)), report):
                for check in self.key.checks:
                    check(k, (*path, str(k)), report)
            self.value.validate(v, (*path, str(k)), report)
        return True


@dataclass
class Obj(Type):
    fields: dict[str, Type]
    required: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()  # at most one field of each group may be set
    checks: tuple[Check, ...] = ()
    open: bool = False  # unknown fields allowed (Kubernetes objects)

    def check_type(self, value: Any, path: Path, report: Report) -> bool:
        if not isinstance(value, dict):
            report.error(path, f"expected an object, got {_type_name(value)}")
            return False
        for name in self.required:
            if value.get(name) in (None, "", [], {}):
                report.error((*path, name), "required field is missing")
        for group in self.one_of:
            present = [g for g in group if value.get(g) is not None]
            if len(present) > 1:
                report.error(path, f"only one of {', '.join(group)} may be set (got {', '.join(present)})")
        for name, v in value.items():
            t = self.fields.get(name) if isinstance(name, str) else None
            if t is None:
                if not self.open:
                    report.error((*path, str(name)), f"unknown field {name!r}")
                continue
            if v is None:
                continue  # an explicit null is an unset field, as in protobuf JSON
            t.validate(v, (*path, name), report)
        return True


def ref(factory: Callable[[], Type]) -> Type:
    """A lazily built type, for recursive schemas (e.g. AuthorizationPolicy conditions)."""

    class _Ref(Type):
        _t: Type | None = None

        def check_type(self, value: Any, path: Path, report: Report) -> bool:
            if self._t is None:
                self._t = factory()
            return self._t.validate(value, path, report)

    return _Ref()
