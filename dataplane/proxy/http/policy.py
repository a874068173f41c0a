"""What the router does when a try fails or answers badly, sans-IO: retry (the route's RetryPolicy,
or once more for the keep-alive race) or answer with Envoy's local reply. The shell
(server.py) owns the timers, the retry budget and the upstream connections.
"""

from __future__ import annotations

from dataplane.proxy.cluster import CONNECT_FAILURE, RESET, TIMEOUT
from dataplane.proxy.routing import RetryPolicy

# Envoy's local reply bodies
NO_HEALTHY_UPSTREAM = b"no healthy upstream"
RESET_BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers. reset reason: "
OVERFLOW_BODY = RESET_BEFORE_HEADERS + b"overflow"
PROTOCOL_ERROR_BODY = RESET_BEFORE_HEADERS + b"protocol error"
TIMEOUT_BODY = b"upstream request timeout"

NO, YES, EXHAUSTED = 0, 1, 2  # retry verdicts; EXHAUSTED: no, and the attempts ran out (flag URX)


def retry_verdict(retry: RetryPolicy | None, body_kept: bool, retries: int, status: int | None,
                  failure: str | None) -> int:
    """Whether the policy retries a try that got `status` (or failed with `failure`) after
    `retries` retries; a request whose body was too big to keep is never retried."""
    if retry is None or not body_kept:
        return NO
    if retry.should_retry(retries, status, failure):
        return YES
    if retries and retries >= retry.attempts and retry.should_retry(0, status, failure):
        return EXHAUSTED
    return NO


def race_retry(failure: str, reused: bool, got_response_bytes: bool, race_retried: bool,
               body_kept: bool) -> bool:
    """The keep-alive race: a server closed a reused connection as we sent, before any response
    byte; the request never reached it, so it goes once more (not counted as a retry), as Envoy does."""
    return reused and not got_response_bytes and not race_retried and body_kept and failure == RESET


def failure_reply(failure: str, detail: str) -> tuple[int, bytes]:
    """The local reply for a try that failed without a response and is not retried."""
    if failure == TIMEOUT:
        return 504, TIMEOUT_BODY
    if failure == CONNECT_FAILURE:
        return 503, RESET_BEFORE_HEADERS + b"connection failure, transport failure reason: " + detail.encode()
    return 503, RESET_BEFORE_HEADERS + b"connection termination"
