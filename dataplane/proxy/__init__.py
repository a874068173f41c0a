"""The sidecar proxy: Envoy's part in Istio's architecture."""
