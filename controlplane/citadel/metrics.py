"""Citadel's Prometheus metrics."""

from prometheus_client import Counter, Gauge

ISSUED = Counter("zmesh_citadel_certs_issued_total", "Workload certificates issued")
REFUSED = Counter("zmesh_citadel_csr_refused_total", "Certificate requests refused", ["reason"])
ROOT_EXPIRY = Gauge("zmesh_citadel_root_expiry_seconds",
                    "Seconds until the signing root expires (plugged in: the first certificate of the "
                    "CA's chain to expire, root included)")
