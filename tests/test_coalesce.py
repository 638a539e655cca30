"""``redis.coalesce``: calls of one script from many tasks share pipelined round trips,
each caller getting its own reply or its own error (real Redis)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from magi_gateway._util import now_ms
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import AgentId, AppId, InstanceId, SessionId
from magi_gateway.core.session import ResultCode
from magi_gateway.redis.coalesce import CoalescedPipeline, CoalescedScript
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings

#: Adds ARGV[1] to the counter KEYS[1] and returns the counter's key and new value; an
#: INCRBY on a key holding a non-number fails that call.
_ADD = "return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[1])}"


def _key(key_prefix: str, name: str) -> str:
    return f"{key_prefix}:{name}"


async def test_concurrent_calls_share_round_trips_and_each_gets_its_own_reply(
    redis_client: Redis, key_prefix: str
) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_ADD))
    keys = [_key(key_prefix, f"n{i % 5}") for i in range(60)]
    replies = await asyncio.gather(*(calls([key], [i]) for i, key in enumerate(keys)))
    for i, (key, reply) in enumerate(zip(keys, replies, strict=True)):
        assert reply[0] == key.encode()
        assert reply[1] >= i  # the counter includes this call's own addition
    # Every addition made it once: each counter is the sum of its calls' arguments.
    for n in range(5):
        assert int(await redis_client.get(_key(key_prefix, f"n{n}"))) == sum(range(n, 60, 5))
    assert calls.calls == 60
    assert 1 <= calls.round_trips < 60
    assert calls._sender is None  # the sender ends with its queue


async def test_a_call_redis_refuses_fails_alone(redis_client: Redis, key_prefix: str) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_ADD))
    spoiled = _key(key_prefix, "spoiled")
    await redis_client.set(spoiled, "not a number")
    keys = [_key(key_prefix, "good")] * 10
    keys[4] = spoiled
    replies = await asyncio.gather(*(calls([key], [1]) for key in keys), return_exceptions=True)
    assert isinstance(replies[4], BackendCommandError)
    assert all(isinstance(r, list) for i, r in enumerate(replies) if i != 4), replies
    assert int(await redis_client.get(_key(key_prefix, "good"))) == 9


async def test_a_script_the_server_lost_is_loaded_again(redis_client: Redis, key_prefix: str) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_ADD))
    await calls([_key(key_prefix, "c")], [1])
    await redis_client.script_flush()  # as after a restart: the server knows no scripts
    replies = await asyncio.gather(*(calls([_key(key_prefix, "c")], [1]) for _ in range(8)))
    assert sorted(r[1] for r in replies) == list(range(2, 10))


async def test_a_cancelled_caller_leaves_the_others_their_replies(
    redis_client: Redis, key_prefix: str
) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_ADD))
    key = _key(key_prefix, "c")
    await calls([key], [0])  # the script is loaded
    await redis_client.client_pause(500)  # the server answers nothing for 500 ms
    first = [asyncio.create_task(calls([key], [1])) for _ in range(5)]
    while len(calls._queue) < 5:
        await asyncio.sleep(0)
    while calls._queue:  # the sender took them: the round trip is in flight, unanswered
        await asyncio.sleep(0)
    second = [asyncio.create_task(calls([key], [100])) for _ in range(5)]
    while len(calls._queue) < 5:  # queued behind it
        await asyncio.sleep(0)
    first[0].cancel()  # in flight: its call runs, its caller is gone
    second[0].cancel()  # queued: its call is never sent
    results = await asyncio.gather(*first, *second, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[5], asyncio.CancelledError)
    assert all(isinstance(r, list) for i, r in enumerate(results) if i not in (0, 5)), results
    assert int(await redis_client.get(key)) == 5 + 4 * 100


#: The value of KEYS[1], as the script sees it.
_READ = "return redis.call('GET', KEYS[1])"


async def test_commands_before_a_call_run_first_in_its_round_trip(
    redis_client: Redis, key_prefix: str
) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_READ))
    keys = [_key(key_prefix, f"b{i}") for i in range(12)]
    replies = await asyncio.gather(
        *(calls([key], [], before=[("SET", key, f"v{i}")]) for i, key in enumerate(keys))
    )
    assert replies == [f"v{i}".encode() for i in range(12)]
    assert calls.calls == 12
    assert calls.round_trips < 12  # each SET went in its call's round trip
    one = CoalescedScript(redis_client, redis_client.register_script(_READ))
    assert await one([keys[0]], [], before=[("SET", keys[0], "a"), ("APPEND", keys[0], "b")]) == b"ab"
    assert one.round_trips == 1


async def test_a_failed_command_before_a_call_is_logged_and_the_call_runs(
    redis_client: Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = CoalescedScript(redis_client, redis_client.register_script(_ADD))
    counter, spoiled = _key(key_prefix, "counted"), _key(key_prefix, "a-string")
    await redis_client.set(spoiled, "not a sorted set")
    with caplog.at_level(logging.WARNING, logger="magi_gateway.redis"):
        replies = await asyncio.gather(
            calls([counter], [1], before=[("ZREM", spoiled, "member")]),  # WRONGTYPE
            calls([counter], [2]),
        )
    assert sorted(reply[1] for reply in replies) == [1, 3]
    assert any("ZREM before a script call failed" in r.getMessage() for r in caplog.records)
    # Also when the script was lost: the commands before it are not sent twice.
    await redis_client.script_flush()
    await calls([counter], [10], before=[("INCR", _key(key_prefix, "once"))])
    assert int(await redis_client.get(counter)) == 13
    assert int(await redis_client.get(_key(key_prefix, "once"))) == 1


async def test_pipelines_of_many_callers_share_round_trips_in_order(
    redis_client: Redis, key_prefix: str
) -> None:
    shared = CoalescedPipeline(redis_client)
    spoiled = _key(key_prefix, "p-spoiled")
    await redis_client.set(spoiled, "not a number")

    async def caller(i: int) -> list[Any]:
        key = _key(key_prefix, f"p{i}")
        commands = [("SET", key, i), ("INCR", key), ("INCR", spoiled if i == 3 else key), ("GET", key)]
        return await shared(commands)

    replies = await asyncio.gather(*(caller(i) for i in range(20)))
    for i, reply in enumerate(replies):
        assert reply[0] is True
        if i == 3:  # its refused command is its own exception, in its place; the rest ran
            assert isinstance(reply[2], ResponseError)
            assert reply[1:2] + reply[3:] == [4, b"4"]
        else:
            assert reply[1:] == [i + 1, i + 2, str(i + 2).encode()]
    assert shared.calls == 20
    assert 1 <= shared.round_trips < 20
    assert shared._sender is None


async def test_a_pipeline_on_an_unreachable_server_raises_in_every_caller(unused_tcp_port: int) -> None:
    client = aioredis.Redis(port=unused_tcp_port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        shared = CoalescedPipeline(client)
        results = await asyncio.gather(*(shared([("PING",)]) for _ in range(4)), return_exceptions=True)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
    finally:
        await client.aclose()


async def test_an_unreachable_server_fails_every_call_as_unavailable(unused_tcp_port: int) -> None:
    client = aioredis.Redis(port=unused_tcp_port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        calls = CoalescedScript(client, client.register_script(_ADD))
        results = await asyncio.gather(*(calls(["k"], [1]) for _ in range(6)), return_exceptions=True)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert calls._sender is None  # and the next call starts a round trip of its own
        with pytest.raises(BackendUnavailable):
            await calls(["k"], [1])
    finally:
        await client.aclose()


async def test_finals_of_many_sessions_written_together_each_complete_its_session(
    redis_client: Redis, settings: Settings
) -> None:
    store = Store(redis_client, Keys(settings.redis_key_prefix))
    agent = AgentId("solo")
    sessions = [SessionId(uuid.uuid4().hex) for _ in range(20)]
    for session_id in sessions:
        await store.create_session(
            session_id, AppId("app"), InstanceId("nobody"), [agent], now_ms() + 60_000, None
        )
    running = store.keys.app_running(AppId("app"))
    await redis_client.zadd(running, {s: now_ms() + 60_000 for s in sessions})  # as admit.lua does
    results = await asyncio.gather(
        *(store.append_final(s, agent, ResultCode.OK, {"decision": "approve"}) for s in sessions)
    )
    assert [(r.seq, r.completed) for r in results] == [(2, True)] * 20
    assert store._append_calls.round_trips < store._append_calls.calls
    assert await redis_client.zcard(running) == 0  # each left its appid's running sessions
    for session_id in sessions:
        entries = await redis_client.xrange(store.keys.session(session_id).log)
        frames: list[dict[str, Any]] = [orjson.loads(fields[b"f"]) for _id, fields in entries]
        assert [f["type"] for f in frames] == [
            "agent_judgement_accepted",
            "agent_judgement_final",
            "agent_judgement_complete",
        ]
        assert [f["seq"] for f in frames] == [1, 2, 3]
        assert frames[2]["data"]["verdict"] == "approve"
