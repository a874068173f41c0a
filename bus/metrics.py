"""Prometheus metrics for the bus, shared by every component that uses it."""

from prometheus_client import Counter, Gauge

SENT = Counter("zmesh_bus_messages_sent_total", "Bus messages sent", ["kind"])
RECEIVED = Counter("zmesh_bus_messages_received_total", "Bus messages received and accepted",
                   ["kind"])
REJECTED = Counter("zmesh_bus_messages_rejected_total",
                   "Bus messages dropped as malformed, unsigned, forged or oversized", ["reason"])
GAPS = Counter("zmesh_bus_sequence_gaps_total", "Sequence gaps seen by subscribers")
RESNAPSHOTS = Counter("zmesh_bus_resnapshots_total", "Subscriber re-snapshots", ["cause"])
AUTH_FAILURES = Counter("zmesh_bus_auth_failures_total",
                        "CURVE/ZAP authentication failures", ["side", "reason"])
CONNECTED_PEERS = Gauge("zmesh_bus_connected_peers",
                        "Peers with a completed ZeroMQ handshake", ["role"])
HANDSHAKE_FAILURES = Counter("zmesh_bus_handshake_failures_total",
                             "Connections that ended before completing a ZeroMQ handshake",
                             ["role", "reason"])
PEER_DISCONNECTS = Counter("zmesh_bus_peer_disconnects_total",
                           "Handshaken peers whose connection ended (they hung up, or broke the "
                           "protocol: a frame over the size limit)", ["role"])
REPORTS_DROPPED = Counter("zmesh_bus_reports_dropped_total",
                          "Reports dropped because the send queue was full")
RPC_RETRIES = Counter("zmesh_bus_rpc_retries_total", "Request retries after a timeout")
RPC_REFUSED = Counter("zmesh_bus_rpc_refused_total",
                      "Requests a server refused to the caller (e.g. not_owner)", ["method", "reason"])
RPC_FAILURES = Counter("zmesh_bus_rpc_failures_total", "Requests that failed", ["reason"])
LOOP_ERRORS = Counter("zmesh_bus_loop_handler_errors_total",
                      "Loop callbacks that raised (logged; the loop kept going)")
