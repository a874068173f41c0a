"""Galley's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

RESOURCES = Gauge("zmesh_galley_resources", "Resources in force", ["kind"])
REJECTED_UNITS = Gauge("zmesh_galley_rejected_units",
                       "Config files/keys whose latest version is invalid (the last valid one stays)")
REJECTIONS = Counter("zmesh_galley_rejections_total",
                     "Versions of config files/keys refused, by the first error's name", ["reason"])
VALIDATION_ERRORS = Counter("zmesh_galley_validation_errors_total", "Validation errors found", ["code"])
PUBLISHES = Counter("zmesh_galley_publishes_total", "Snapshot publishes")
PUBLISHED_CHANGES = Counter("zmesh_galley_published_changes_total", "Resources published", ["op"])
SOURCE_ERRORS = Counter("zmesh_galley_source_errors_total", "Source read/connection errors", ["source"])
PUBLISH_DELAY = Histogram("zmesh_galley_publish_delay_seconds",
                          "From the first change of a burst to its publish",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
