"""The hook's retry policy: which answers are worth another attempt, and how long to wait before it."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime

import requests


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # attempts per call, the first included
    max_elapsed: float = 120.0  # seconds per call, sleeps included
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # a Retry-After beyond this is clamped

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: FullStory's Retry-After when it gave one (clamped, plus a
        little jitter so parallel tasks do not return in lockstep), else equal-jitter exponential backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max) + random.uniform(0.0, 0.25)
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)


def retryable(outcome: requests.Response | BaseException) -> bool:
    """Connection errors, timeouts, 408, 429 and 5xx except 501 (Not Implemented will not change).

    Also 409: FullStory answers it while a request with the same Idempotency-Key is still executing, which
    with our deterministic keys means our own earlier attempt (say, one that timed out) is in progress."""
    if isinstance(outcome, BaseException):
        if isinstance(outcome, requests.exceptions.SSLError):
            return False  # a certificate problem does not heal by waiting
        return isinstance(outcome, requests.ConnectionError | requests.Timeout)
    status = outcome.status_code
    return status in (408, 409, 429) or (status >= 500 and status != 501)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
