"""security.istio.io: PeerAuthentication, AuthorizationPolicy, RequestAuthentication."""

from controlplane.config.schema import Map, Obj, Str, Type
from controlplane.config.validators import Labels, Port

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")

_selector = Obj({"matchLabels": Labels()})
_mtls = Obj({"mode": Str(enum=MTLS_MODES)})

SCHEMAS: dict[str, Type] = {
    "PeerAuthentication": Obj({
        "selector": _selector,
        "mtls": _mtls,
        "portLevelMtls": Map(_mtls, key=Port()),
    }),
}
