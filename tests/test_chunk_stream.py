"""The worker's chunk path (``worker/appender.py``) on a real Redis: ``ctx.think`` queues and
returns, chunks share round trips, ride out an outage in order, and a full queue makes
``think`` wait (overflow policy: wait)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from magi_gateway import Context, Judgement, agent
from magi_gateway._util import Backoff, now_ms
from magi_gateway.core import frames
from magi_gateway.core.session import new_session_id
from magi_gateway.embedded import RedisServer
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.appender import ChunkAppender
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import eventually
from .test_worker import queue_sessions, run_burst, session_log


async def test_an_agent_that_never_yields_streams_in_few_round_trips_and_in_order(
    settings: Settings, store: Store
) -> None:
    @agent("torrent")
    async def torrent(user_input: str, ctx: Context) -> Judgement:
        for i in range(200):
            await ctx.think(f"{user_input}-{i}")  # queued: no Redis round trip awaited here
        return Judgement("done", decision="approve")

    (session_id,) = await queue_sessions(store, "torrent", ["t"])
    worker = Worker([torrent], settings, burst=True)
    await run_burst(worker)
    logged = await session_log(store, session_id)
    assert [m["seq"] for m in logged] == list(range(1, len(logged) + 1))
    assert [m["data"]["thinking"] for m in logged[1:-2]] == [f"t-{i}" for i in range(200)]
    assert [m["type"] for m in logged[-2:]] == ["agent_judgement_final", "agent_judgement_complete"]
    assert worker.appender.chunks == 200
    # At most max_run chunks of one stream per round trip, and no round trip per chunk.
    assert 200 / worker.appender.max_run <= worker.appender.round_trips < 200 / 2
    # The completion's deadline went out with the ack, in one shared round trip.
    assert not await store.redis.zscore(store.keys.deadlines, session_id)


def test_the_prebuilt_affixes_make_the_same_tail() -> None:
    for extra in ({}, {"attempt": 2}):
        prefix, suffix = frames.stream_tail_affixes("melchior", extra)
        text = 'ü ☃ "quoted"\n'
        assert prefix + orjson.dumps(text) + suffix == frames.stream_tail(
            "melchior", {"thinking": text, **extra}
        )


async def test_chunks_wait_out_an_outage_in_order_and_a_full_queue_makes_put_wait(
    redis_server: RedisServer, key_prefix: str
) -> None:
    settings = Settings(_env_file=None, redis_url=redis_server.url, redis_key_prefix=key_prefix)  # type: ignore[call-arg]
    redis = connect(settings)
    store = Store(redis, Keys(key_prefix))
    appender = ChunkAppender(store, Backoff(0.01, 0.05), max_queued=4, max_run=2)
    try:
        session_id = new_session_id()
        await store.create_session(session_id, "app", "no-gateway", ["solo"], now_ms() + 60_000, None)
        stream = appender.stream(session_id, "solo")
        redis_server.stop()  # graceful: what was written is on disk

        put: list[int] = []

        async def think_all() -> None:
            for i in range(10):
                assert await stream.put(f"chunk {i}")
                put.append(i)

        thinker = asyncio.create_task(think_all())

        async def blocked() -> bool:
            # Waiting for room: the queue is full and every round trip fails.
            return stream._room is not None and not stream._room.done() and len(stream.queued) >= 4

        await eventually(blocked, timeout=10, what="put to wait for room")
        assert not thinker.done()
        assert len(put) < 10
        redis_server.start()
        await asyncio.wait_for(thinker, 20)
        await asyncio.wait_for(stream.drain(), 20)
        logged: list[dict[str, Any]] = [
            orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, 2)
        ]
        # Nothing lost, nothing twice (the round trips failed before reaching a server), in order.
        assert [m["data"]["thinking"] for m in logged] == [f"chunk {i}" for i in range(10)]
        assert [m["seq"] for m in logged] == list(range(2, 12))
    finally:
        await appender.aclose()
        await redis.aclose()


@pytest.fixture
def store(redis_client: Any, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix))


async def test_chunks_redis_refuses_close_the_stream_instead_of_retrying(
    settings: Settings, store: Store
) -> None:
    # Bad data under the session's log (WRONGTYPE for its XADD) cannot be cured by
    # retrying (#12 item 6): the stream closes, the agent's next think raises, and the
    # request ends instead of retrying its chunks forever.
    outcome: list[str] = []

    @agent("spoiled")
    async def spoiled(user_input: str, ctx: Context) -> Judgement:
        await ctx.think("first")  # written: the script is loaded, the pipeline path is taken
        log = store.keys.session(ctx.session_id).log
        for _ in range(100):
            if await store.redis.xlen(log) >= 2:
                break
            await asyncio.sleep(0.01)
        await store.redis.delete(log)
        await store.redis.set(log, "not a stream", px=60_000)
        try:
            for i in range(50):
                await ctx.think(f"chunk {i}")
                await asyncio.sleep(0.01)
        except Exception as exc:  # the SDK's exception for a closed judgement
            outcome.append(type(exc).__name__)
            raise
        outcome.append("finished")
        return Judgement("never logged", decision="approve")

    await queue_sessions(store, "spoiled", ["x"])
    worker = Worker([spoiled], settings, burst=True)
    await run_burst(worker, timeout=20)
    assert outcome == ["JudgementClosed"]
