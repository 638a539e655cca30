"""Small helpers every driver uses: wall-clock milliseconds and reconnect backoff."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from redis.backoff import ExponentialWithJitterBackoff

__all__ = ["Backoff", "now_ms"]


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of deadlines and heartbeats in Redis."""
    return int(time.time() * 1000)


class Backoff:
    """Capped exponential backoff with jitter for retry loops (redis-py's formula).

    One per loop: ``next_delay`` after each failure, ``reset`` after a success.
    ``failed`` also logs the first failure of an outage once, so every loop reports
    outages the same way (one warning, not one per attempt).
    """

    def __init__(self, base_s: float, cap_s: float) -> None:
        self._policy = ExponentialWithJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    @classmethod
    def for_settings(cls, settings: _BackoffSettings) -> Backoff:
        """The backoff configured by ``REDIS_BACKOFF_BASE_S`` and ``REDIS_BACKOFF_CAP_S``."""
        return cls(settings.redis_backoff_base_s, settings.redis_backoff_cap_s)

    def next_delay(self) -> float:
        """Delay before the next attempt; each call counts one more failure."""
        self.failures += 1
        return float(self._policy.compute(self.failures))

    def failed(self, logger: logging.Logger, what: str, exc: BaseException) -> float:
        """Count a failure, log it if it starts an outage, and return the delay to wait."""
        delay = self.next_delay()
        if self.failures == 1:
            logger.warning("%s failed (%s); retrying", what, exc.__cause__ or exc)
        return delay

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0


class _BackoffSettings(Protocol):
    """What ``Backoff.for_settings`` reads (``Settings`` has it)."""

    @property
    def redis_backoff_base_s(self) -> float: ...

    @property
    def redis_backoff_cap_s(self) -> float: ...
