"""Retries with exponential backoff and full jitter, for every network source."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from warehouse.sources.base import SourceFetchError

T = TypeVar("T")
log = logging.getLogger("mambacast.sources")


class RetryableError(Exception):
    """A failure worth retrying: HTTP 429 or 5xx, a timeout, a dropped connection."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


def with_retries(
    call: Callable[[], T],
    *,
    source: str,
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run `call`, retrying RetryableError; after the last attempt raise SourceFetchError.

    `source` and `what` (e.g. "BTC/USDT 1h from 2024-01-01 to 2024-02-01") name the failure.
    A server's Retry-After, when given, is honoured if longer than the jittered delay.
    """
    rng = rng or random.Random()
    last: RetryableError | None = None
    for attempt in range(policy.attempts):
        try:
            return call()
        except RetryableError as exc:
            last = exc
            if attempt == policy.attempts - 1:
                break
            wait = max(policy.delay(attempt, rng), exc.retry_after_s or 0.0)
            log.warning(
                "%s: %s failed (%s); retry %d/%d in %.1f s",
                source,
                what,
                exc,
                attempt + 1,
                policy.attempts - 1,
                wait,
            )
            sleep(wait)
    raise SourceFetchError(
        f"{source}: fetching {what} failed after {policy.attempts} attempts: {last}"
    ) from last
