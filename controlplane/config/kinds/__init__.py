"""Spec schemas per kind. Each module registers the kinds of one API group."""

from controlplane.config.kinds import kube, networking, security
from controlplane.config.schema import Type

SPEC_SCHEMAS: dict[str, Type] = {**networking.SCHEMAS, **security.SCHEMAS, **kube.SCHEMAS}
