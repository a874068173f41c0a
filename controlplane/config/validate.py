"""From YAML text to validated resources and diagnostics.

Each document is checked for its envelope (apiVersion, kind, metadata), then its spec
against the kind's schema. Kinds we do not support yet are reported, not crashed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path as FsPath

from controlplane.config.diagnostics import ERROR, WARNING, ConfigError, Diagnostic
from controlplane.config.kinds import SPEC_SCHEMAS
from controlplane.config.model import CLUSTER_SCOPED, SUPPORTED, Resource, split_api_version
from controlplane.config.schema import Report
from controlplane.config.validators import Labels, check_dns1123_label, check_dns1123_subdomain
from controlplane.config.yamlload import Document, load_documents, read_config_file

UNSUPPORTED_KIND = ("ZM0001", "UnsupportedKind")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadResult:
    resources: list[Resource] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.level == "Error"]

    def extend(self, other: LoadResult) -> None:
        self.resources += other.resources
        self.diagnostics += other.diagnostics


def validate_document(doc: Document, strict: bool = False) -> tuple[Resource | None, list[Diagnostic]]:
    """One YAML document -> a Resource if it is usable, plus every problem found. An unsupported
    kind is a warning (galley ignores it, as Istio ignores kinds it does not know); `strict`
    makes it an error, for `meshctl apply`: applying what would be ignored is a mistake."""
    data = doc.data
    report = Report(doc.line_of, file=doc.file)
    if not isinstance(data, dict):
        report.error((), f"a resource must be a mapping, got {type(data).__name__}")
        return None, report.diagnostics
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if not isinstance(api_version, str) or not api_version:
        report.error(("apiVersion",), "apiVersion is missing")
    if not isinstance(kind, str) or not kind:
        report.error(("kind",), "kind is missing")
    if report.diagnostics:
        return None, report.diagnostics
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        report.error(("metadata",), "metadata must be a mapping")
        return None, report.diagnostics
    name, namespace = meta.get("name"), meta.get("namespace")
    default_ns = "" if kind in CLUSTER_SCOPED else "default"
    report.context.update(kind=kind, resource=str(name or ""), namespace=str(namespace or default_ns))
    group, version = split_api_version(api_version)
    known = SUPPORTED.get(kind)
    if known is None or known[0] != group:
        report.add(ERROR if strict else WARNING, ("kind",),
                   f"{api_version} {kind} is not supported by zmesh yet" + ("" if strict else "; ignored"),
                   code=UNSUPPORTED_KIND)
        return None, report.diagnostics
    if version not in known[1]:
        supported = ", ".join(f"{group}/{v}" if group else v for v in known[1])
        report.error(("apiVersion",), f"{kind} does not exist in {api_version} (supported: {supported})")
        return None, report.diagnostics
    if not isinstance(name, str) or not name:
        report.error(("metadata", "name"), "metadata.name is required")
        return None, report.diagnostics
    check_dns1123_subdomain(name, ("metadata", "name"), report)
    if kind in CLUSTER_SCOPED:
        namespace = ""
    elif namespace is None:
        namespace = "default"
    elif not isinstance(namespace, str):
        report.error(("metadata", "namespace"), "namespace must be a string")
        namespace = "default"
    else:
        check_dns1123_label(namespace, ("metadata", "namespace"), report, "namespace")
    report.context["namespace"] = namespace
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    Labels().validate(labels, ("metadata", "labels"), report)
    spec = data.get("spec")
    schema = SPEC_SCHEMAS.get(kind)
    if schema is not None:
        if spec is None:
            spec = {}
        schema.validate(spec, ("spec",), report)
    resource = Resource(api_version=api_version, kind=kind, name=name, namespace=namespace,
                        spec=spec if isinstance(spec, dict) else {},
                        labels=labels if isinstance(labels, dict) else {},
                        annotations=annotations if isinstance(annotations, dict) else {},
                        raw=data, doc=doc)
    return resource, report.diagnostics


def load_text(text: str, file: str = "<input>", strict: bool = False) -> LoadResult:
    result = LoadResult()
    try:
        docs = load_documents(text, file)
    except ConfigError as exc:
        result.diagnostics.append(exc.diagnostic)
        return result
    for doc in docs:
        resource, diagnostics = validate_document(doc, strict)
        result.diagnostics += diagnostics
        if resource is not None and not any(d.level == "Error" for d in diagnostics):
            result.resources.append(resource)
    return result


def load_file(path: str | FsPath, strict: bool = False) -> LoadResult:
    path = FsPath(path)
    try:
        text = read_config_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        result = LoadResult()
        result.diagnostics.append(Diagnostic("Error", "IST0106", "SchemaValidationError",
                                             f"cannot read: {exc}", file=str(path)))
        return result
    return load_text(text, str(path), strict)


def yaml_files(paths: list[str | FsPath]) -> list[FsPath]:
    """Files named directly, plus every *.yaml/*.yml under named directories (sorted)."""
    out: list[FsPath] = []
    for p in map(FsPath, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in YAML_SUFFIXES and f.is_file()
                          and not f.name.startswith("."))
        else:
            out.append(p)
    return out


def load_paths(paths: list[str | FsPath], strict: bool = False) -> LoadResult:
    result = LoadResult()
    for f in yaml_files(paths):
        result.extend(load_file(f, strict))
    return result
