"""Redis connections and the boundary where Redis errors become ``BackendUnavailable``
(an outage: callers retry with backoff) or ``BackendCommandError`` (Redis refused the
command itself: retrying cannot help).

``REDIS_URL`` may name a Sentinel-managed master instead of one server::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTION=VALUE&...]
    rediss+sentinel://...    (TLS to the sentinels and to the data nodes)

``HOST[:PORT]`` are sentinels (port 26379 when omitted, IPv6 as ``[::1]:26379``),
``SERVICE`` is the master's name in the sentinels' configuration, ``DB`` defaults to 0.
``USER`` and ``PASSWORD`` (percent-encoded) authenticate to the data nodes. Options:
``sentinel_username`` and ``sentinel_password`` authenticate to the sentinels,
``max_connections`` caps the pool. How clients follow a failover: ``redis.sentinel.FailoverPool``.

Or a Redis Cluster::

    redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]
    rediss+cluster://...     (TLS)

``HOST:PORT`` are seed nodes (any of them; the client learns the others). The cluster
client (redis-py's ``RedisCluster``) routes each command by its key's slot and follows
MOVED/ASK redirections and failovers of a shard to its replica; ``REDIS_MAX_CONNECTIONS``
is then per node.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePath

from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from magi_gateway.core.errors import BackendCommandError, BackendUnavailable, GatewayError
from magi_gateway.redis.packing import with_hiredis_packing
from magi_gateway.redis.sentinel import FailoverPool
from magi_gateway.redis.urls import parse_cluster_url, parse_sentinel_url
from magi_gateway.settings import Settings

__all__ = [
    "KEEPALIVE",
    "RedisClient",
    "closed_transport",
    "connect",
    "dropped_writer",
    "gateway_error",
    "listen",
    "open_pubsub",
    "redis_errors",
]

#: A client of one server (or a Sentinel-managed master), or of a Redis Cluster.
RedisClient = Redis | RedisCluster

# A command is retried this many times on a dropped connection before the caller
# sees BackendUnavailable; longer outages are ridden out by the callers' own loops.
_COMMAND_RETRIES = 3

#: TCP keepalive of every connection: a server or link gone silent is found dead about
#: 11 s after its last packet (idle 5 s, then 3 probes 2 s apart). redis-py 8.2 made a
#: 5 s ``socket_timeout`` its default, which runs every command's write in a task of
#: its own (``asyncio.wait_for``) and its read under a timeout: 15 % of the worker's CPU
#: per chunk below saturation (BENCHMARKS.md). ``REDIS_SOCKET_TIMEOUT_S`` sets one anyway.
KEEPALIVE: dict[int, int] = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


def connect(
    settings: Settings,
    *,
    client_name: str = "magi-gateway",
    retries: int = _COMMAND_RETRIES,
    max_connections: int | None = None,
) -> RedisClient:
    """A Redis client for ``settings.redis_dsn`` (``redis://``, ``rediss://``, ``unix://``,
    or a ``redis+sentinel://`` master, see the module docstring).

    ``retries=0`` makes every connection failure surface at once: the notification
    listener needs that, because a silent reconnect inside redis-py would skip the
    catch-up read of what was published while it was away. ``max_connections`` caps the
    pool (per node in a cluster); default ``REDIS_MAX_CONNECTIONS``.
    """
    pool_size = settings.redis_max_connections if max_connections is None else max_connections
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
            max_connections=pool_size,
            health_check_interval=10,
            socket_connect_timeout=5,
            socket_timeout=settings.redis_socket_timeout_s or None,
            socket_keepalive=True,
            socket_keepalive_options=KEEPALIVE,
            client_name=client_name,
        )
    # A blocking pool: redis-py's default pool raises as soon as its cap is reached,
    # which under a burst of sessions turned into backend_unavailable errors.
    pool_class = FailoverPool if parse_sentinel_url(settings.redis_dsn) else BlockingConnectionPool
    pool = pool_class.from_url(
        settings.redis_dsn,
        max_connections=pool_size,
        timeout=settings.redis_pool_timeout_s,
        decode_responses=False,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=settings.redis_socket_timeout_s or None,
        socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE,
        client_name=client_name,
    )
    pool.connection_class = with_hiredis_packing(pool.connection_class)
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


async def listen(
    client: RedisClient,
    channels: Sequence[str],
    on_message: Callable[[bytes, bytes], None],
    *,
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Subscribe to ``channels`` and call ``on_message(channel, data)`` for each message.

    Runs until the subscription fails (``BackendUnavailable``: the caller reconnects with
    backoff) or it is cancelled; ``on_subscribed`` is called once the subscription is in
    place. The read blocks without a timeout: cancelling a read with a timeout can be
    lost when both happen at once (``asyncio.timeout`` in 3.11), hanging shutdown.
    """
    pubsub: PubSub | None = None
    try:
        with redis_errors():
            pubsub = await open_pubsub(client)
            await pubsub.subscribe(*channels)
            if on_subscribed is not None:
                on_subscribed()
            await _read_messages(pubsub, on_message)
    finally:
        if pubsub is not None:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py


_MESSAGE = b"message"
_READ_SIZE = 1 << 16


async def _read_messages(pubsub: PubSub, on_message: Callable[[bytes, bytes], None]) -> None:
    """Hand each published message to ``on_message`` until the connection fails.

    The hot path of every gateway: one call per network read, one ``on_message`` per
    message. redis-py's ``PubSub.listen`` costs about 40 µs of CPU per message here
    (its retry wrapper, parser indirections and message dicts), more than the rest of
    a chunk's way to the client; so after redis-py has connected, authenticated and
    subscribed, this reads the replies off the same connection with the same hiredis
    reader. redis-py internals used (pinned in constraints.txt): the connection's
    ``_parser`` with its ``_reader`` (``hiredis.Reader``, whose "no reply yet" value is
    ``NOT_ENOUGH_DATA``) and ``_stream``. Without
    hiredis, redis-py's own loop is used.
    """
    connection = pubsub.connection
    parser = getattr(connection, "_parser", None)
    reader = getattr(parser, "_reader", None)
    stream = getattr(parser, "_stream", None)
    if reader is None or stream is None or not hasattr(reader, "gets"):  # pragma: no cover - no hiredis
        async for message in pubsub.listen():
            on_message(message["channel"], message["data"])
        return
    gets, feed, read = reader.gets, reader.feed, stream.read
    while True:
        reply = gets()
        while reply is not NOT_ENOUGH_DATA and reply is not False:
            if isinstance(reply, Exception):
                raise reply
            if reply[0] == _MESSAGE:  # not a (un)subscribe confirmation or a pong
                on_message(reply[1], reply[2])
            reply = gets()
        data = await read(_READ_SIZE)
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        feed(data)


#: Error replies that mean "not now" rather than "never": a replica during a failover,
#: a cluster resharding or down, a server loading or busy with a script, out of memory
#: (until something expires), a consumer group not created yet (workers recreate it),
#: a script not loaded yet (``Script`` objects load it).
_TRANSIENT_REPLIES = (
    "READONLY",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "BUSY",
    "OOM",
    "NOGROUP",
    "NOSCRIPT",
)


def gateway_error(exc: Exception) -> GatewayError:
    """The gateway's error for a Redis failure: an outage, or a refused command."""
    if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT_REPLIES):
        error: GatewayError = BackendCommandError("Internal server error")
    else:
        error = BackendUnavailable("Backend temporarily unavailable")
    error.__cause__ = exc
    return error


def closed_transport(exc: BaseException) -> bool:
    """Whether ``exc`` is uvloop's ``RuntimeError`` for a write on a closed transport: a
    connection lost while redis-py reconnected (seen in a Sentinel failover, from its
    ``connect`` sending its first command on a socket the server had just closed)."""
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


def dropped_writer(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's own ``AttributeError`` for a write on a connection
    another task disconnected meanwhile (its writer is ``None``): a connection lost while
    it reconnected, seen in a Sentinel failover from ``connect`` sending its first
    command. Only an error raised inside redis-py's asyncio connection module counts."""
    if not isinstance(exc, AttributeError) or "'NoneType'" not in str(exc):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return PurePath(tb.tb_frame.f_code.co_filename).parts[-3:] == ("redis", "asyncio", "connection.py")


@contextmanager
def redis_errors() -> Iterator[None]:
    """Convert any Redis failure inside the block to ``BackendUnavailable`` (an outage) or
    ``BackendCommandError`` (an error reply retrying cannot cure, see ``gateway_error``)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise gateway_error(exc) from exc
    except (RuntimeError, AttributeError) as exc:
        if not (closed_transport(exc) or dropped_writer(exc)):
            raise
        raise gateway_error(exc) from exc
