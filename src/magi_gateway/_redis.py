"""Redis connections and the boundary where Redis errors become ``BackendUnavailable``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import BackendUnavailable
from .settings import Settings

__all__ = ["Backoff", "connect", "redis_errors"]

# A command is retried this many times on a dropped connection before the caller
# sees BackendUnavailable; longer outages are ridden out by the callers' own loops.
_COMMAND_RETRIES = 3


class Backoff:
    """Capped exponential backoff with jitter for reconnect loops (wraps redis-py's)."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self._policy = ExponentialWithJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> Backoff:
        """The backoff configured by ``REDIS_BACKOFF_BASE_S`` and ``REDIS_BACKOFF_CAP_S``."""
        return cls(settings.redis_backoff_base_s, settings.redis_backoff_cap_s)

    def next_delay(self) -> float:
        """Delay before the next attempt; each call counts one more failure."""
        self.failures += 1
        return float(self._policy.compute(self.failures))

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0


def connect(
    settings: Settings, *, client_name: str = "magi-gateway", retries: int = _COMMAND_RETRIES
) -> Redis:
    """A Redis client for ``settings.redis_dsn`` (``redis://``, ``rediss://``, ``unix://``).

    ``retries=0`` makes every connection failure surface at once: the notification
    listener needs that, because a silent reconnect inside redis-py would skip the
    catch-up read of what was published while it was away.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.redis_backoff_cap_s, base=settings.redis_backoff_base_s),
        retries=retries,
    )
    # A blocking pool: redis-py's default pool raises as soon as its cap is reached,
    # which under a burst of sessions turned into backend_unavailable errors.
    pool = BlockingConnectionPool.from_url(
        settings.redis_dsn,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        decode_responses=False,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_keepalive=True,
        client_name=client_name,
    )
    return Redis.from_pool(pool)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Convert any Redis failure inside the block to ``BackendUnavailable``."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable("Backend temporarily unavailable") from exc
    except OSError as exc:
        raise BackendUnavailable("Backend temporarily unavailable") from exc
