"""What each proxy runs: pilot's record of sends, ACKs and NACKs (sans-IO).

States, as `meshctl proxy-status` shows them:
- NOT SENT: the proxy is known but no config was published for it yet;
- SENT: the last version went out less than `stale_after` seconds ago, no reply yet;
- SYNCED: it ACKed the version last sent;
- STALE: the last version sent has had no reply within `stale_after` seconds;
- NACKED: it rejected the last version sent (with the error and the version still in force).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NOT_SENT = "NOT SENT"
SENT = "SENT"
SYNCED = "SYNCED"
STALE = "STALE"
NACKED = "NACKED"


@dataclass
class ProxyRecord:
    proxy: str
    sent: str = ""          # the version last sent
    sent_at: float = 0.0
    acked: str = ""         # the version last ACKed
    nacked: str = ""        # the version last NACKed
    error: str = ""
    in_force: str = ""      # what the proxy says it runs (after a NACK: its last good version)
    last_contact: float = 0.0


class StatusTracker:
    def __init__(self, stale_after: float = 5.0) -> None:
        self.stale_after = stale_after
        self.records: dict[str, ProxyRecord] = {}

    def _record(self, proxy: str) -> ProxyRecord:
        rec = self.records.get(proxy)
        if rec is None:
            rec = self.records[proxy] = ProxyRecord(proxy)
        return rec

    def known(self, proxy: str, now: float) -> None:
        self._record(proxy).last_contact = now

    def forget(self, proxy: str) -> None:
        self.records.pop(proxy, None)

    def sent(self, proxy: str, version: str, now: float) -> None:
        rec = self._record(proxy)
        if rec.sent != version:
            rec.sent, rec.sent_at = version, now

    def ack(self, proxy: str, version: str, now: float) -> None:
        rec = self._record(proxy)
        rec.acked = rec.in_force = version
        rec.last_contact = now
        rec.nacked, rec.error = "", ""  # its latest word: it runs `version` happily

    def nack(self, proxy: str, version: str, error: str, in_force: str, now: float) -> None:
        rec = self._record(proxy)
        rec.nacked, rec.error, rec.in_force = version, error, in_force
        rec.last_contact = now

    def state(self, proxy: str, now: float) -> str:
        rec = self.records.get(proxy)
        if rec is None or not rec.sent:
            return NOT_SENT
        if rec.nacked == rec.sent:
            return NACKED
        if rec.acked == rec.sent:
            return SYNCED
        return STALE if now - rec.sent_at > self.stale_after else SENT

    def rows(self, now: float) -> list[dict[str, Any]]:
        out = []
        for proxy in sorted(self.records):
            rec = self.records[proxy]
            out.append({"proxy": proxy, "state": self.state(proxy, now), "sent": rec.sent,
                        "acked": rec.acked, "in_force": rec.in_force, "nacked": rec.nacked,
                        "error": rec.error,
                        "since_contact_s": round(now - rec.last_contact, 3) if rec.last_contact else None})
        return out
