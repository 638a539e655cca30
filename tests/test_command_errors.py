"""A Redis command error is an error, not an outage (#12 item 6, second half).

Redis answers a command on a key holding the wrong type with ``WRONGTYPE``: retrying
cannot cure that. Here real keys are overwritten with a string (bad data under a
session's keys), against a real gateway and Redis: the client gets ``internal_error``
naming the session and the loops move on, where before they retried forever in silence.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from magi_gateway._util import Backoff, now_ms
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.session import new_session_id
from magi_gateway.redis.client import KEEPALIVE, closed_transport, connect, dropped_writer, redis_errors
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.server.sweeper import sweep_deadlines
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from . import agents_for_tests
from ._delivery_helpers import assert_nothing_more
from ._support import GatewayHandle, assert_clean_error, judge, recv, send

StartWorker = Callable[..., Awaitable[Worker]]


async def test_a_replay_refused_by_redis_answers_internal_error_and_moves_on(
    gateway: GatewayHandle, start_worker: StartWorker, redis_client: Redis, key_prefix: str
) -> None:
    await start_worker([agents_for_tests.echo])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["echo"])
    session_id = record.messages[0]["session_id"]
    log = Keys(key_prefix).session(session_id).log
    await redis_client.delete(log)
    await redis_client.set(log, "not a stream", px=60_000)  # XRANGE on it: WRONGTYPE

    async with await gateway.connect() as ws:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 0})
        error = await recv(ws)
        assert_clean_error(error, "internal_error")
        assert error["session_id"] == session_id
        await assert_nothing_more(ws)  # the connection is fine, nothing else queued
        # And the gateway still serves other sessions.
        again = await judge(ws, ["echo"])
        assert again.finals["echo"]["result_code"] == 0


async def test_the_deadline_sweep_moves_past_a_session_redis_refuses(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    store = Store(redis_client, keys)
    broken, fine = new_session_id(), new_session_id()
    soon = now_ms() + 60_000
    for session_id in (broken, fine):
        await store.create_session(session_id, "app", "nobody", ["melchior"], soon, None)
    await redis_client.delete(keys.session(broken).meta)
    await redis_client.set(keys.session(broken).meta, "not a hash", px=60_000)  # HGETALL: WRONGTYPE
    # The broken session is due first, so a sweep stuck on it never reaches the other.
    await redis_client.zadd(keys.deadlines, {broken: soon - 1})

    sweep = asyncio.create_task(
        sweep_deadlines(store, 1, lambda: Backoff(0.01, 0.1), now=lambda: now_ms() + 3_600_000)
    )
    try:
        async with asyncio.timeout(10):
            while (info := await store.session_info(fine)) is None or not info.completed:
                await asyncio.sleep(0.05)
    finally:
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
    assert await redis_client.zscore(keys.deadlines, broken) is None  # handled: not swept again


async def test_command_errors_and_outages_are_told_apart(redis_client: Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:a-string"
    await redis_client.set(key, "x", px=60_000)
    with pytest.raises(BackendCommandError) as refused, redis_errors():
        await redis_client.xrange(key)
    assert "WRONGTYPE" in str(refused.value.__cause__)
    assert refused.value.code == "internal_error"
    assert str(refused.value) == "Internal server error"
    dead = Redis(host="127.0.0.1", port=1)
    try:
        with pytest.raises(BackendUnavailable), redis_errors():
            await dead.ping()
    finally:
        await dead.aclose()


async def test_a_write_on_a_connection_another_task_disconnected_is_an_outage(redis_client: Redis) -> None:
    # redis-py reconnecting during a Sentinel failover sent its first command on a
    # connection another task had just disconnected: its writer is None there, and
    # redis-py raises an AttributeError, not a ConnectionError. It once filled the viewers'
    # lease renewal with tracebacks. It is an outage like any lost connection. (redis-py
    # 8.2 raises its own ConnectionError there: an outage too.)
    connection = Connection(**redis_client.connection_pool.connection_kwargs)
    await connection.connect()
    await connection.disconnect()
    with pytest.raises(BackendUnavailable) as lost, redis_errors():
        await connection._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    cause = lost.value.__cause__
    if isinstance(cause, AttributeError):
        assert dropped_writer(cause)
    else:
        assert isinstance(cause, RedisConnectionError), cause
    missing: object = None
    with pytest.raises(AttributeError), redis_errors():
        missing.writelines([])  # type: ignore[attr-defined]  # outside redis-py: a defect, not mapped


def test_a_write_on_a_closed_uvloop_transport_is_an_outage() -> None:
    # redis-py reconnecting during a Sentinel failover wrote its first command on a socket
    # the server had just closed: uvloop raises a RuntimeError there, not an OSError, and
    # it once ended the viewers' lease renewal. It is an outage like any lost connection.
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.abort()
        await asyncio.sleep(0)
        with pytest.raises(BackendUnavailable) as lost, redis_errors():
            writer.writelines([b"PING\r\n"])
        assert closed_transport(lost.value.__cause__)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="unrelated"), redis_errors():
            raise RuntimeError("unrelated")  # any other RuntimeError is a defect, not mapped
        server.close()
        await server.wait_closed()

    uvloop.run(main())


async def test_commands_wait_for_a_slow_server_unless_a_socket_timeout_is_set(
    settings: Settings, redis_client: Redis
) -> None:
    # No client-side timeout by default (redis-py 8.2's 5 s default cost every command a
    # task): a server that answers late is waited for; a dead one is found by keepalive.
    patient = connect(settings)
    hasty = connect(settings.model_copy(update={"redis_socket_timeout_s": 0.2}))
    try:
        for client in (patient, hasty):
            await client.ping()  # connected before the pause
        connection = patient.connection_pool.connection_kwargs
        assert connection["socket_timeout"] is None
        assert connection["socket_keepalive"] is True
        assert connection["socket_keepalive_options"] == KEEPALIVE
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert KEEPALIVE[socket.TCP_KEEPIDLE] == 5
        await redis_client.client_pause(3000)  # the server answers nobody for 3 s (the
        # hasty client's retries, 0.2 s each and their backoff, end well within it)
        with pytest.raises(BackendUnavailable), redis_errors():
            await hasty.ping()
        with redis_errors():
            assert await patient.ping() is True
    finally:
        await redis_client.client_unpause()
        await patient.aclose()
        await hasty.aclose()
