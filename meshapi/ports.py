"""The sidecar's ports: Istio's numbers, fixed in every pod (control-plane ports are bus.endpoints').

pilot-agent, the proxy, istio-init's iptables rules and `meshctl up` all need them; iptables
must never redirect them and the proxy must never connect to them (blackhole.py).
"""

from __future__ import annotations

PROXY_ADMIN = 15000         # the proxy's admin (127.0.0.1)
OUTBOUND = 15001            # what the workload dials out, REDIRECTed by iptables
HANDOVER_ADMIN = 15002      # the second admin/metrics pair: a hot restart alternates between the two
HANDOVER_METRICS = 15091
DECIDER_METRICS = 15005     # the NFQUEUE decider's metrics
INBOUND = 15006             # what reaches the workload, REDIRECTed by iptables
AGENT_METRICS = 15020       # pilot-agent's merged /stats/prometheus (the one to scrape)
HEALTH = 15021              # pilot-agent's /healthz/ready
PROXY_METRICS = 15090       # the proxy's own Prometheus endpoint

# the proxy never connects to these, whoever listens there (blackhole.py)
RESERVED = frozenset({PROXY_ADMIN, OUTBOUND, INBOUND, AGENT_METRICS, HEALTH, PROXY_METRICS})
