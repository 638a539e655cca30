"""Redis connections and the boundary where Redis errors become ``BackendUnavailable``.

``REDIS_URL`` may name a Sentinel-managed master instead of one server::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTION=VALUE&...]
    rediss+sentinel://...    (TLS to the sentinels and to the data nodes)

``HOST[:PORT]`` are sentinels (port 26379 when omitted, IPv6 as ``[::1]:26379``),
``SERVICE`` is the master's name in the sentinels' configuration, ``DB`` defaults to 0.
``USER`` and ``PASSWORD`` (percent-encoded) authenticate to the data nodes. Options:
``sentinel_username`` and ``sentinel_password`` authenticate to the sentinels,
``max_connections`` caps the pool. How clients follow a failover: ``_FailoverPool``.

Or a Redis Cluster::

    redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]
    rediss+cluster://...     (TLS)

``HOST:PORT`` are seed nodes (any of them; the client learns the others). The cluster
client (redis-py's ``RedisCluster``) routes each command by its key's slot and follows
MOVED/ASK redirections and failovers of a shard to its replica; ``REDIS_MAX_CONNECTIONS``
is then per node.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import parse_qsl, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.settings import Settings

__all__ = [
    "ClusterURL",
    "RedisClient",
    "SentinelURL",
    "connect",
    "open_pubsub",
    "parse_cluster_url",
    "parse_sentinel_url",
    "redis_errors",
]

logger = logging.getLogger(__name__)

#: A client of one server (or a Sentinel-managed master), or of a Redis Cluster.
RedisClient = Redis | RedisCluster

# A command is retried this many times on a dropped connection before the caller
# sees BackendUnavailable; longer outages are ridden out by the callers' own loops.
_COMMAND_RETRIES = 3


def connect(
    settings: Settings, *, client_name: str = "magi-gateway", retries: int = _COMMAND_RETRIES
) -> RedisClient:
    """A Redis client for ``settings.redis_dsn`` (``redis://``, ``rediss://``, ``unix://``,
    or a ``redis+sentinel://`` master, see the module docstring).

    ``retries=0`` makes every connection failure surface at once: the notification
    listener needs that, because a silent reconnect inside redis-py would skip the
    catch-up read of what was published while it was away.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.redis_backoff_cap_s, base=settings.redis_backoff_base_s),
        retries=retries,
    )
    cluster = parse_cluster_url(settings.redis_dsn)
    if cluster is not None:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
            username=cluster.username,
            password=cluster.password,
            ssl=cluster.ssl,
            decode_responses=False,
            retry=retry,
            max_connections=settings.redis_max_connections,
            health_check_interval=10,
            socket_connect_timeout=5,
            socket_keepalive=True,
            client_name=client_name,
        )
    # A blocking pool: redis-py's default pool raises as soon as its cap is reached,
    # which under a burst of sessions turned into backend_unavailable errors.
    pool_class = _FailoverPool if parse_sentinel_url(settings.redis_dsn) else BlockingConnectionPool
    pool = pool_class.from_url(
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


async def open_pubsub(client: RedisClient) -> PubSub:
    """A pub/sub of ``client``, ignoring subscribe confirmations.

    A cluster client must know the slot map before its pub/sub can pick a node, and
    only commands load it by themselves.
    """
    if isinstance(client, RedisCluster):
        await client.initialize()
        # A client used only for pub/sub never sees the MOVED replies that refresh the
        # slot map: refresh it at each (re)subscription, or a failed-over node is kept.
        await client.nodes_manager.initialize()
    return client.pubsub(ignore_subscribe_messages=True)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Convert any Redis failure inside the block to ``BackendUnavailable``."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable("Backend temporarily unavailable") from exc
    except OSError as exc:
        raise BackendUnavailable("Backend temporarily unavailable") from exc


# -- Cluster ---------------------------------------------------------------------------------

#: URL schemes of a Redis Cluster (``rediss+``: TLS).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class ClusterURL:
    """The parts of a ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_cluster_url(url: str) -> ClusterURL | None:
    """The seed nodes of a cluster URL, None for other schemes; ``ValueError`` when malformed."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    netloc = rest.partition("?")[0].partition("/")[0]
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    nodes = []
    for text in hosts.split(","):
        host, port = _address(text, None)
        if port is None:
            raise ValueError(f"cluster node {text!r} is not HOST:PORT")
        nodes.append((host, port))
    return ClusterURL(
        nodes=tuple(nodes),
        username=unquote(user) if at and user else None,
        password=unquote(password) if at and colon else None,
        ssl=scheme.lower() == "rediss+cluster",
    )


# -- Sentinel --------------------------------------------------------------------------------

#: URL schemes of a Sentinel-managed master (``rediss+``: TLS everywhere).
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("max_connections", "sentinel_password", "sentinel_username")
#: Connecting to one sentinel, or waiting for its answer, before asking the next one.
_SENTINEL_TIMEOUT_S = 2.0
#: Error replies from a master that no longer takes writes although redis-py's READONLY
#: handling does not see it: it lost its replica under ``min-replicas-to-write``, or a
#: blocked command was cut short by its demotion.
_NOT_MASTER_REPLIES = ("NOREPLICAS", "UNBLOCKED")


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    max_connections: int | None = None


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The parts of a Sentinel URL, None for other schemes; ``ValueError`` when malformed.

    Messages never quote the URL, which may hold a password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    names = [unquote(part) for part in path.removesuffix("/").split("/")] if path else []
    if not names or not names[0] or len(names) > 2:
        raise ValueError("a sentinel REDIS_URL ends in /SERVICE or /SERVICE/DB")
    if len(names) == 2 and not names[1].isdigit():
        raise ValueError("the DB of a sentinel REDIS_URL is a number")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_SENTINEL_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown sentinel REDIS_URL option {unknown[0]!r}; known: {', '.join(_SENTINEL_OPTIONS)}"
        )
    max_connections = options.get("max_connections")
    if max_connections is not None and not (max_connections.isdigit() and int(max_connections) > 0):
        raise ValueError("max_connections in a sentinel REDIS_URL is a positive number")
    return SentinelURL(
        sentinels=tuple(_sentinel_address(host) for host in hosts.split(",")),
        service_name=names[0],
        db=int(names[1]) if len(names) == 2 else 0,
        username=unquote(user) if at and user else None,
        password=unquote(password) if at and colon else None,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=scheme.lower() == "rediss+sentinel",
        max_connections=int(max_connections) if max_connections else None,
    )


def _sentinel_address(text: str) -> tuple[str, int]:
    host, port = _address(text, _SENTINEL_PORT)
    assert port is not None
    return host, port


def _address(text: str, default_port: int | None) -> tuple[str, int | None]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]``."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"address {text!r} is not [IPV6]:PORT")
        port = port[1:]
    else:
        host, _, port = text.partition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"address {text!r} is not HOST[:PORT]")
    return host, int(port) if port else default_port


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
_POOLS: weakref.WeakSet[_FailoverPool] = weakref.WeakSet()


class _FailoverPool(SentinelConnectionPool, BlockingConnectionPool):
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
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
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
