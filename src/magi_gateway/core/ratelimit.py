"""A token bucket, sans-I/O: the caller passes the time, so tests need no clock."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allows ``rate_per_s`` events per second on average and bursts of ``burst``."""

    __slots__ = ("_tokens", "_updated", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        elapsed = max(now - self._updated, 0.0)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
