"""networking.istio.io: VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Gateway, Sidecar."""

from controlplane.config.schema import Type

SCHEMAS: dict[str, Type] = {}
