"""Multi-document YAML with line numbers for every field, within bounds.

PyYAML composes a node tree that still knows where each node started; we build plain
Python values from it and keep a map from field path to line, so that a validation
error can name `spec.http[0].route[1].weight` and the line it is on.

YAML aliases (`*x`) make a graph of a tree: a few hundred bytes of nested aliases ("billion
laughs") expand to hundreds of millions of nodes. The loader counts what aliases add while composing, before
anything is expanded, and refuses a file past a bound, naming the alias's line and column;
nesting depth and file size are bounded too. Real config uses aliases sparingly, if at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.cyaml import CParser
from yaml.events import AliasEvent
from yaml.resolver import Resolver

from controlplane.config.diagnostics import ERROR, ConfigError, Diagnostic

Path = tuple[str | int, ...]

# IST0101..: Istio's codes. YAML that cannot be parsed is Istio's "InternalError"-free
# equivalent of a schema failure: we report it under the schema code.
SCHEMA_CODE = ("IST0106", "SchemaValidationError")
# zmesh's own: input past the loader's bounds (alias expansion, depth, size)
LIMIT_CODE = ("ZM0003", "ConfigTooLarge")
# What aliases may add to one file: nodes, and characters of scalars (one long anchored string
# aliased many times is the "quadratic" variant). Shared anchors in real config add hundreds.
MAX_ALIAS_NODES = 10_000
MAX_ALIAS_CHARS = 1_000_000
# Istio's deepest resources nest some 15 levels; libyaml itself stops at 1,000, past Python's stack.
MAX_DEPTH = 100
# 1.5 MiB is the most etcd (so Kubernetes) holds per object; a file may hold several.
MAX_FILE_CHARS = 8 * 1024 * 1024
# libyaml's parser is ~20x faster than PyYAML's pure-Python one and keeps the same marks
# (PyYAML's Linux wheels include it).
_Loader = yaml.CSafeLoader


class _Refused(Exception):
    """The input is past a bound, at `mark`."""

    def __init__(self, mark: yaml.Mark, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


def _too_deep() -> str:
    return f"YAML nested deeper than {MAX_DEPTH} levels"


def _depth_check(depth: int, mark: yaml.Mark) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(mark, _too_deep())


class _BoundedLoader(Composer, CParser, SafeConstructor, Resolver):
    """libyaml's events, composed in Python to count what every alias would expand to.

    The composer shares an aliased node rather than copying it, so composing costs no more
    than the text; the count tells what building values from the graph would cost, and the
    first alias that takes it past a bound is refused before anything is expanded."""

    def __init__(self, text: str) -> None:
        CParser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._nodes = 0   # nodes so far, with aliases expanded
        self._chars = 0   # characters of scalars so far, with aliases expanded
        self._alias_nodes = 0
        self._alias_chars = 0
        self._sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, chars) it expands to
        self._depth = 0

    def compose_document(self) -> yaml.Node:
        self._sizes = {}  # anchors are per document
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            size = self._sizes.get(event.anchor)
            if size is None and event.anchor in self.anchors:
                raise _Refused(event.start_mark, f"YAML alias *{event.anchor} is inside its own anchor")
            if size is not None:  # (an undefined alias is the composer's error)
                self._alias_nodes += size[0]
                self._alias_chars += size[1]
                self._nodes += size[0]
                self._chars += size[1]
                if self._alias_nodes > MAX_ALIAS_NODES:
                    raise _Refused(event.start_mark,
                                   f"YAML alias expansion exceeds {MAX_ALIAS_NODES} nodes (alias bomb?)")
                if self._alias_chars > MAX_ALIAS_CHARS:
                    raise _Refused(event.start_mark,
                                   f"YAML alias expansion exceeds {MAX_ALIAS_CHARS} characters (alias bomb?)")
            return super().compose_node(parent, index)
        self._depth += 1
        _depth_check(self._depth, event.start_mark)
        before = (self._nodes, self._chars)
        self._nodes += 1
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.ScalarNode):
            self._chars += len(node.value)
        self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = (self._nodes - before[0], self._chars - before[1])
        return node


@dataclass
class Document:
    file: str
    index: int              # position in a multi-document file
    line: int               # the line the document starts on (1-based)
    data: Any
    marks: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.marks:
                return self.marks[path]
            path = path[:-1]
        return self.line


def _error(file: str, line: int, message: str, code: tuple[str, str] = SCHEMA_CODE,
           column: int = 0) -> ConfigError:
    return ConfigError(Diagnostic(ERROR, *code, message=message, file=file, line=line, column=column))


_MERGE = "tag:yaml.org,2002:merge"


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:  # (or CSafeLoader)
        self.loader = loader
        self.file = file
        self.marks: dict[Path, int] = {}

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.marks[path] = node.start_mark.line + 1
        _depth_check(len(path) + 1, node.start_mark)  # (libyaml composes without counting)
        if isinstance(node, yaml.MappingNode):
            own = sum(k.tag != _MERGE for k, _ in node.value)
            self.loader.flatten_mapping(node)  # merged (`<<: *x`) pairs first, then the node's own
            merged = len(node.value) - own
            out: dict[Any, Any] = {}
            inherited: set[Any] = set()  # keys from a merge, which the node's own keys override
            for i, (key_node, value_node) in enumerate(node.value):
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise _error(self.file, key_node.start_mark.line + 1, "mapping key is not a scalar")
                if key in out and key not in inherited:
                    raise _error(self.file, key_node.start_mark.line + 1, f"duplicate key {key!r}")
                (inherited.add if i < merged else inherited.discard)(key)
                out[key] = self.build(value_node, (*path, str(key)))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)


def load_documents(text: str, file: str = "<input>") -> list[Document]:
    """Every non-empty document in `text`; malformed or oversized YAML raises ConfigError with
    its line (and column where one applies)."""
    if len(text) > MAX_FILE_CHARS:
        raise _error(file, 0, f"the file exceeds {MAX_FILE_CHARS} characters", LIMIT_CODE)
    docs: list[Document] = []
    loader = None
    try:
        # no '&', no anchor, so no alias to expand: libyaml may compose on its own, fast
        loader = _Loader(text) if "&" not in text else _BoundedLoader(text)
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            builder = _Builder(loader, file)
            data = builder.build(node, ())
            if data is not None:
                docs.append(Document(file, index, node.start_mark.line + 1, data, builder.marks))
            index += 1
    except _Refused as exc:
        raise _error(file, exc.mark.line + 1, exc.message, LIMIT_CODE, exc.mark.column + 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = exc.problem or exc.context or "invalid YAML"
        if "maximum nesting depth" in problem:  # libyaml's own bound, past ours
            raise _error(file, line, _too_deep(), LIMIT_CODE, column) from None
        raise _error(file, line, f"invalid YAML: {problem}", column=column) from None
    except yaml.YAMLError as exc:
        raise _error(file, 0, f"invalid YAML: {exc}") from None
    except RecursionError:  # the depth bound keeps this away unless the caller's stack is deep
        raise _error(file, 0, _too_deep(), LIMIT_CODE) from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def read_config_file(path: str | os.PathLike) -> str:
    """A config file's text, reading no more than the loader accepts (which then refuses it):
    a huge file costs no more memory than a file at the limit."""
    with open(path, encoding="utf-8") as f:
        return f.read(MAX_FILE_CHARS + 1)
