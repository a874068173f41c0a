"""Where services and their endpoints come from: Istio's serviceregistry, over files and node agents.

Istio keeps one registry per source (kube, serviceentry) behind an aggregate controller;
zmesh does the same with config resources instead of an API server (kube.py, serviceentry.py,
aggregate.py; model.py holds what they share), plus the workloads node agents register at run
time (leases.py: their lease is how a dead node's endpoints leave).

As in Istio, a workload - a Pod, a WorkloadEntry or a registration - backs every
Kubernetes Service whose selector matches it in its namespace, and every ServiceEntry
whose workloadSelector does. Deployments have no addresses in a manifest, so they give
no endpoints, only labels (for subsets). Sans-IO: time is passed in as `now`; every
list is sorted, so equal inputs give equal outputs.
"""
