"""The mesh on one machine: namespaces, the bookinfo demo, bring-up (`meshctl up`/`down`, tests/e2e)."""
