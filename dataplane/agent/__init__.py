"""The pilot-agent: runs the proxy, restarts it, reports its health, merges metrics, drains it."""
