"""The node agent's Prometheus metrics (served on the nodeagent metrics port)."""

from prometheus_client import Counter, Gauge

CERTS_ISSUED = Counter("zmesh_nodeagent_certificates_issued_total",
                       "Workload certificates received from citadel and written for proxies")
RENEWAL_FAILURES = Counter("zmesh_nodeagent_certificate_renewal_failures_total",
                           "Certificate requests that failed", ["reason"])
EARLIEST_EXPIRY = Gauge("zmesh_nodeagent_cert_expiry_seconds",
                        "Seconds until the earliest workload certificate on the node expires "
                        "(negative: expired; NaN before the first certificate)")
WORKLOADS_REGISTERED = Gauge("zmesh_nodeagent_workloads_registered",
                             "Workloads of this node that pilot confirmed registered")
WORKLOADS = Gauge("zmesh_nodeagent_workloads", "Workloads the node agent knows of")
