"""Config groups: proxies that must get identical config share one published key.

A sidecar's config is a function of its namespace, labels and service account (the
translation reads nothing else about it), so those inputs name its group. A fleet of
identical replicas is one group: one translation, one encode, one signature, and
every replica subscribes to `cfg/g/<group>/` (and to the shared set its manifest names).
Pilot and the proxy both compute the id from the same inputs, so it lives here.
"""

from __future__ import annotations

import hashlib
import json

from meshapi.parts import GROUP_PREFIX


def group_id(namespace: str, labels: dict[str, str], service_account: str) -> str:
    blob = json.dumps([namespace, sorted(labels.items()), service_account], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def topic(group: str) -> str:
    """The prefix a group's keys live under."""
    return f"{GROUP_PREFIX}{group}/"
