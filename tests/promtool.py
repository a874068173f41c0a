"""`promtool check metrics` (Debian's `prometheus` package) as the judge of our expositions.

KNOWN are its lint lines that stay on purpose, for Istio and Envoy compatibility (dashboards and
alerts query these names; docs/architecture.md, "Metrics"): Istio's duration histogram in
milliseconds, and Envoy's counters whose names lack "_total". Any other line is a defect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

from dataplane.proxy.stats import DURATION, ENVOY_COUNTERS
from tests.conftest import unavailable

UNIT = f'{DURATION} use base unit "seconds" instead of "milliseconds"'
KNOWN = frozenset({UNIT, *(f'{name} counter metrics should have "_total" suffix'
                          for name in ENVOY_COUNTERS if not name.endswith("_total"))})


def lint(text: str) -> list[str]:
    """promtool's problem lines for `text`, sorted ([] when clean). Text it cannot parse fails the test."""
    if shutil.which("promtool") is None:
        unavailable("promtool missing (Debian package prometheus)")
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)
    lines = sorted(line for line in (done.stdout + done.stderr).splitlines() if line.strip())
    # 0: clean, 3: lint problems (listed), anything else: not a valid exposition
    assert done.returncode in (0, 3), f"promtool exit {done.returncode}: {lines}\n{text[:2000]}"
    assert (done.returncode == 3) == bool(lines), (done.returncode, lines)
    return lines


def expected(text: str) -> list[str]:
    """The KNOWN lines promtool prints for `text`, sorted: those of families with samples in it
    (promtool skips a family that is declared only)."""
    return sorted(line for line in KNOWN
                  if re.search(rf"^{re.escape(line.split()[0])}(_bucket|_sum|_count)?[{{ ]", text, re.M))


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def scrape(url: str, timeout: float = 10.0) -> str:
    """GET a metrics endpoint as Prometheus does (text format 0.0.4): 200, the 0.0.4 content type,
    and a body that is never empty (every component declares its families from the start)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy
    with direct.open(url, timeout=timeout) as resp:
        assert resp.status == 200, (url, resp.status)
        assert resp.headers["content-type"] == CONTENT_TYPE, (url, resp.headers["content-type"])
        body = resp.read().decode()
    assert "# TYPE " in body, (url, body[:500])
    return body
