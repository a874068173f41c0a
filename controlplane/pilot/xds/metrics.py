"""Pilot's Prometheus metrics (Istio's pilot_* names where one exists, zmesh_ otherwise)."""

from prometheus_client import Counter, Gauge, Histogram

PUSHES = Counter("zmesh_pilot_pushes_total", "Debounced pushes")
PUSH_SECONDS = Histogram("zmesh_pilot_push_seconds", "Time to translate and publish one push",
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
PROXIES = Gauge("pilot_xds", "Connected (registered) proxies")
GROUP_PUBLISHES = Counter("zmesh_pilot_group_publishes_total", "Config group keys published")
PARTS_PUBLISHED = Counter("zmesh_pilot_parts_published_total", "Config part keys published or deleted")
