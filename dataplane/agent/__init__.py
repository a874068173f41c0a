"""The pilot-agent: runs the proxy and the NFQUEUE decider, restarts them, reports readiness (with
the certificates), merges metrics, hands the proxy over (SIGHUP) and drains it (SIGTERM)."""
