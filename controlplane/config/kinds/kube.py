"""The parts of Kubernetes objects zmesh reads: services, workloads and their labels.

Kubernetes' schemas are large and not ours to police, so objects are open (unknown
fields pass); only the fields pilot uses are type-checked.
"""

from controlplane.config.schema import AnyValue, Int, List, Map, Obj, Str, Type
from controlplane.config.validators import Labels, Port

_service_port = Obj({
    "name": Str(), "port": Port(), "targetPort": AnyValue(), "protocol": Str(enum=("TCP", "UDP", "SCTP")),
    "appProtocol": Str(), "nodePort": Int(0, 65535),
}, required=("port",), open=True)

_pod_template = Obj({
    "metadata": Obj({"labels": Labels(), "annotations": Map(Str())}, open=True),
    "spec": Obj({"serviceAccountName": Str(), "containers": List(AnyValue())}, open=True),
}, open=True)

SCHEMAS: dict[str, Type] = {
    "Service": Obj({"selector": Labels(), "ports": List(_service_port), "type": Str(),
                    "clusterIP": Str()}, open=True),
    "Deployment": Obj({"selector": Obj({"matchLabels": Labels()}, open=True), "replicas": Int(0),
                       "template": _pod_template}, open=True),
    "Pod": Obj({"serviceAccountName": Str(), "containers": List(AnyValue())}, open=True),
}
