"""Multi-document YAML with line numbers for every field.

PyYAML composes a node tree that still knows where each node started; we build plain
Python values from it and keep a map from field path to line, so that a validation
error can name `spec.http[0].route[1].weight` and the line it is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from controlplane.config.diagnostics import ERROR, ConfigError, Diagnostic

Path = tuple[str | int, ...]

# IST0101..: Istio's codes. YAML that cannot be parsed is Istio's "InternalError"-free
# equivalent of a schema failure: we report it under the schema code.
SCHEMA_CODE = ("IST0106", "SchemaValidationError")
# libyaml's parser is ~20x faster than PyYAML's pure-Python one and keeps the same marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def _error(file: str, line: int, message: str) -> ConfigError:
    return ConfigError(Diagnostic(ERROR, *SCHEMA_CODE, message=message, file=file, line=line))


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:  # (or CSafeLoader)
        self.loader = loader
        self.file = file
        self.marks: dict[Path, int] = {}

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.marks[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise _error(self.file, key_node.start_mark.line + 1, "mapping key is not a scalar")
                if key in out:
                    raise _error(self.file, key_node.start_mark.line + 1, f"duplicate key {key!r}")
                out[key] = self.build(value_node, (*path, str(key)))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)


def load_documents(text: str, file: str = "<input>") -> list[Document]:
    """Every non-empty document in `text`; malformed YAML raises ConfigError with its line."""
    docs: list[Document] = []
    loader = None
    try:
        loader = _Loader(text)  # the reader already rejects control characters
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
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise _error(file, line, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise _error(file, 0, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _error(file, 0, "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs
