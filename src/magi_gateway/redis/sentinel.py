"""Following a Sentinel-managed master: a blocking pool whose connections ask the sentinels.

How clients follow a failover: ``FailoverPool``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Self

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from magi_gateway.redis.urls import parse_sentinel_url

__all__ = ["FailoverPool"]

logger = logging.getLogger(__name__)

#: Connecting to one sentinel, or waiting for its answer, before asking the next one.
_SENTINEL_TIMEOUT_S = 2.0
#: Error replies from a master that no longer takes writes although redis-py's READONLY
#: handling does not see it: it lost its replica under ``min-replicas-to-write``, or a
#: blocked command was cut short by its demotion.
_NOT_MASTER_REPLIES = ("NOREPLICAS", "UNBLOCKED")


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master that treats "no longer the writable master" as a lost link.

    redis-py does so for READONLY (a demoted master). Closing the connection makes the
    command's retry, and every later connection, ask the sentinels for the master anew.
    """

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith(_NOT_MASTER_REPLIES):
                raise
            await self.disconnect()
            raise RedisConnectionError("The Redis master does not take writes now") from exc


class _MasterSSLConnection(_MasterConnection, SSLConnection):
    pass


#: Every open Sentinel pool of this process, so that all of them learn when a master moves.
_POOLS: weakref.WeakSet[FailoverPool] = weakref.WeakSet()


class FailoverPool(SentinelConnectionPool, BlockingConnectionPool):
    """A blocking pool of connections to the master that the sentinels name.

    Connections look the master up when they connect; a failover reaches them as a
    dropped connection, READONLY or NOREPLICAS (all retried as connection errors).
    When one pool of this process finds the master has moved, every pool of the same
    service drops all its connections, busy ones too: commands in flight are retried
    on the new master, and a pub/sub listener sees its connection lost and catches up
    instead of staying subscribed to the old master, which no longer gets the writes.
    """

    def __init__(
        self, service_name: str, sentinel_manager: Sentinel, *, group: tuple[Any, ...], **kwargs: Any
    ) -> None:
        ssl = kwargs.pop("ssl", False)
        kwargs.setdefault("connection_class", _MasterSSLConnection if ssl else _MasterConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.group = group
        _POOLS.add(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """A pool for a ``redis+sentinel://`` URL, with ``kwargs`` for the master connections."""
        parsed = parse_sentinel_url(url)
        if parsed is None:
            raise ValueError("REDIS_URL is not a redis+sentinel:// URL")
        if parsed.max_connections is not None:
            kwargs["max_connections"] = parsed.max_connections
        sentinels = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
            parsed.sentinels,
            sentinel_kwargs={
                "username": parsed.sentinel_username,
                "password": parsed.sentinel_password,
                "ssl": parsed.ssl,
                "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
                "socket_timeout": _SENTINEL_TIMEOUT_S,
                "socket_keepalive": True,
                # One retry for a connection the sentinel dropped while idle; an
                # unreachable sentinel is skipped for the next one, not waited for.
                "retry": Retry(NoBackoff(), 1),
            },
        )
        return cls(
            parsed.service_name,
            sentinels,
            group=(parsed.service_name, parsed.sentinels),
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.ssl,
            **kwargs,
        )

    async def get_master_address(self) -> Any:
        """The master's address from the sentinels; on a change, drop every stale connection."""
        previous = self.master_address
        address = await super().get_master_address()  # type: ignore[no-untyped-call]
        if previous is not None and address != previous:
            logger.warning("Redis master %r moved to %s:%s", self.service_name, *address)
            for pool in [p for p in _POOLS if p.group == self.group]:
                if pool is self or pool.master_address not in (None, address):
                    pool.master_address = address
                    try:
                        await pool.disconnect(inuse_connections=True)
                    except (RedisError, OSError) as exc:
                        logger.debug("closing connections to the old master failed: %r", exc)
        return address

    async def aclose(self) -> None:
        """Close the pool's connections, then those to the sentinels."""
        _POOLS.discard(self)
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()
