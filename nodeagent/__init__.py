"""The node agent: one per node. It registers the node's workloads with pilot, holds their keys,
gets and rotates their certificates from citadel, and relays pilot's config to local proxies."""
