"""Many viewers per session (issue #13): any number of connections of the session's appid,
on any instance, follow one session at once, each with its own cursor, each getting every
message once and in order; up to ``MAX_VIEWERS_PER_SESSION``. Real uvicorn gateways (in
process and a killed subprocess), real workers, a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import websockets
from redis.asyncio import Redis

from magi_gateway.core.ids import SessionId
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import (
    Gated,
    assert_nothing_more,
    collect_until_complete,
    eventually,
    logged,
    record_of,
)
from ._support import (
    SECRET,
    GatewayHandle,
    assert_clean_error,
    assert_well_formed,
    judgement_message,
    recv,
    send,
    spawn_gateway,
    stop_process,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]
Message = dict[str, Any]


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix), retention_s=settings.session_retention_s)


def resume(session_id: str, last_seq: int) -> Message:
    return {"type": "resume", "session_id": session_id, "last_seq": last_seq}


@contextlib.asynccontextmanager
async def viewer(handle: GatewayHandle, appid: str | None = None) -> AsyncIterator[tuple[Any, str]]:
    """An authenticated connection and its ``connection_id``."""
    async with websockets.connect(handle.ws_url(*(appid,) if appid else ())) as ws:
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "connection_established"
        yield ws, hello["connection_id"]


async def receive(ws: Any, count: int) -> list[Message]:
    """The next ``count`` frames, none of them an error."""
    got = [await recv(ws) for _ in range(count)]
    assert all("error" not in m for m in got), got
    return got


async def open_session(ws: Any, agent: str, chunks_before_gate: int) -> list[Message]:
    """Start a judgement and read what the agent streams before its gate (accepted first)."""
    await send(ws, judgement_message([agent]))
    return await receive(ws, 1 + chunks_before_gate)


async def entries(store: Store, session_id: str) -> set[tuple[str, str]]:
    return set(await store.viewers.entries(SessionId(session_id)))


# -- every viewer gets every message once, in order --------------------------------------------------


@pytest.mark.parametrize("where", ["one-instance", "two-instances"])
async def test_viewers_of_one_session_receive_identical_sequences(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store, where: str
) -> None:
    gated = Gated("gated", before=3, after=40)
    await start_worker([gated.agent])
    first = await start_gateway(settings)
    second = first if where == "one-instance" else await start_gateway(settings)

    async with viewer(first) as (opener, opener_id), viewer(second) as (follower, follower_id):
        seen_by_opener = await open_session(opener, "gated", 3)
        session_id = seen_by_opener[0]["session_id"]
        # The follower joins from the start; the opener keeps its stream (nothing is stolen).
        await send(follower, resume(session_id, 0))
        seen_by_follower = await receive(follower, 4)
        assert seen_by_follower == seen_by_opener
        assert await entries(store, session_id) == {
            (first.gateway.instance_id, opener_id),  # type: ignore[union-attr]
            (second.gateway.instance_id, follower_id),  # type: ignore[union-attr]
        }
        gated.gate.set()  # the rest is live, for both at once
        seen_by_opener += await collect_until_complete(opener, session_id)
        seen_by_follower += await collect_until_complete(follower, session_id)
        await assert_nothing_more(opener)
        await assert_nothing_more(follower)

    assert seen_by_opener == seen_by_follower == await logged(store, session_id)
    assert_well_formed(record_of(seen_by_opener), ["gated"])
    assert len(record_of(seen_by_opener).of_type("agent_judgement_stream")) == 43
    assert gated.invocations == 1


async def test_four_viewers_on_two_instances_each_get_everything_once(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=60)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with (
        viewer(first) as (a, _),
        viewer(first) as (b, _),
        viewer(second) as (c, _),
        viewer(second) as (d, _),
    ):
        seen = {"a": await open_session(a, "gated", 2)}
        session_id = seen["a"][0]["session_id"]
        for name, ws in (("b", b), ("c", c), ("d", d)):
            await send(ws, resume(session_id, 0))
            seen[name] = await receive(ws, 3)
        gated.gate.set()
        for name, ws in (("a", a), ("b", b), ("c", c), ("d", d)):
            seen[name] += await collect_until_complete(ws, session_id)
            await assert_nothing_more(ws)
    log = await logged(store, session_id)
    for messages in seen.values():
        assert messages == log  # every seq once, in order, for each of them
    assert_well_formed(record_of(log), ["gated"])


async def test_a_viewer_joining_mid_stream_with_last_seq_gets_exactly_the_rest(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=5, after=20)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with viewer(first) as (opener, _), viewer(second) as (late, _):
        seen = await open_session(opener, "gated", 5)
        session_id = seen[0]["session_id"]
        # It saw up to seq 4 elsewhere (a page reloaded, say): it gets 5 on, nothing before.
        await send(late, resume(session_id, 4))
        late_seen = await receive(late, 2)
        assert [m["seq"] for m in late_seen] == [5, 6]
        gated.gate.set()
        seen += await collect_until_complete(opener, session_id)
        late_seen += await collect_until_complete(late, session_id)
        await assert_nothing_more(late)
    assert late_seen == seen[4:]
    assert seen == await logged(store, session_id)


async def test_a_repeated_resume_by_a_viewer_is_not_a_second_viewer(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=5)
    await start_worker([gated.agent])
    gateway = await start_gateway(settings.model_copy(update={"max_viewers_per_session": 2}))
    async with viewer(gateway) as (opener, _), viewer(gateway) as (follower, _):
        seen = await open_session(opener, "gated", 2)
        session_id = seen[0]["session_id"]
        await send(follower, resume(session_id, 0))
        assert await receive(follower, 3) == seen
        await send(follower, resume(session_id, 3))  # the same viewer again: not refused
        await send(opener, resume(session_id, 3))  # nor the opener
        await assert_nothing_more(follower)
        await assert_nothing_more(opener)
        assert len(await entries(store, session_id)) == 2
        gated.gate.set()
        rest = await collect_until_complete(follower, session_id)
        assert await collect_until_complete(opener, session_id) == rest
    assert seen + rest == await logged(store, session_id)


# -- viewers come and go -----------------------------------------------------------------------------


async def test_one_viewer_disconnecting_does_not_disturb_the_others(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=3, after=30)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with viewer(first) as (opener, opener_id), viewer(second) as (other, other_id):
        seen = await open_session(opener, "gated", 3)
        session_id = seen[0]["session_id"]
        await send(other, resume(session_id, 0))
        other_seen = await receive(other, 4)
        async with viewer(first) as (leaving, leaving_id):
            await send(leaving, resume(session_id, 2))
            assert await receive(leaving, 2) == seen[2:]
        # It is gone: no longer a viewer in Redis either; the others carry on.
        await eventually(
            lambda: _without(store, session_id, leaving_id), what="the closed viewer to be removed"
        )
        assert await entries(store, session_id) == {
            (first.gateway.instance_id, opener_id),  # type: ignore[union-attr]
            (second.gateway.instance_id, other_id),  # type: ignore[union-attr]
        }
        gated.gate.set()
        seen += await collect_until_complete(opener, session_id)
        other_seen += await collect_until_complete(other, session_id)
    assert seen == other_seen == await logged(store, session_id)
    assert_well_formed(record_of(seen), ["gated"])


async def _without(store: Store, session_id: str, connection_id: str) -> bool:
    return all(c != connection_id for _, c in await entries(store, session_id))


async def test_the_opener_disconnecting_leaves_the_followers_streaming(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=20)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with viewer(second) as (follower, _):
        async with viewer(first) as (opener, opener_id):
            seen = await open_session(opener, "gated", 2)
            session_id = seen[0]["session_id"]
            await send(follower, resume(session_id, 0))
            follower_seen = await receive(follower, 3)
        await eventually(lambda: _without(store, session_id, opener_id), what="the opener to be removed")
        gated.gate.set()
        follower_seen += await collect_until_complete(follower, session_id)
    assert follower_seen == await logged(store, session_id)


async def test_cancel_by_a_follower_finishes_the_session_for_every_viewer(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with viewer(first) as (opener, _), viewer(second) as (follower, _):
        seen = await open_session(opener, "gated", 2)
        session_id = seen[0]["session_id"]
        await send(follower, resume(session_id, 3))
        await send(follower, {"type": "cancel", "session_id": session_id})
        rest = await collect_until_complete(follower, session_id)
        assert await collect_until_complete(opener, session_id) == rest
    assert record_of(seen + rest).finals["gated"]["result_code"] == 4
    assert seen + rest == await logged(store, session_id)
    gated.gate.set()


# -- bounds and ownership ----------------------------------------------------------------------------


async def test_over_the_viewer_limit_resume_is_refused_and_the_connection_stays(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    limited = settings.model_copy(update={"max_viewers_per_session": 3})
    gated = Gated("gated", before=2, after=3)
    await start_worker([gated.agent])
    first, second = await start_gateway(limited), await start_gateway(limited)
    async with (
        viewer(first) as (opener, _),
        viewer(first) as (b, _),
        viewer(second) as (c, _),
        viewer(second) as (refused, refused_id),
    ):
        seen = await open_session(opener, "gated", 2)
        session_id = seen[0]["session_id"]
        for ws in (b, c):
            await send(ws, resume(session_id, 0))
            assert await receive(ws, 3) == seen
        # The bound is across instances: a fourth viewer, on either, is refused.
        async with viewer(first) as (fourth, _):
            for ws in (refused, fourth):
                await send(ws, resume(session_id, 0))
                error = await recv(ws)
                assert_clean_error(error, "too_many_viewers")
                assert error["session_id"] == session_id
                await assert_nothing_more(ws)  # still open, and given none of the session
        assert len(await entries(store, session_id)) == 3

        # Once a viewer goes, there is room again.
        await b.close()

        async def admitted() -> list[Message] | None:
            await send(refused, resume(session_id, 0))
            reply = await recv(refused)
            if reply.get("code") == "too_many_viewers":
                return None
            return [reply, *await receive(refused, 2)]

        assert await eventually(admitted, what="room for another viewer") == seen
        assert refused_id in {c for _, c in await entries(store, session_id)}
        gated.gate.set()
        rest = await collect_until_complete(refused, session_id)
        assert await collect_until_complete(opener, session_id) == rest
        assert await collect_until_complete(c, session_id) == rest


async def test_another_appid_gets_not_found_and_is_never_a_viewer(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    async with viewer(gateway) as (opener, opener_id), viewer(gateway, "intruder-app") as (intruder, _):
        seen = await open_session(opener, "gated", 2)
        session_id = seen[0]["session_id"]
        for message in (resume(session_id, 0), {"type": "cancel", "session_id": session_id}):
            await send(intruder, message)
            error = await recv(intruder)
            assert_clean_error(error, "session_not_found")
            assert error["session_id"] == session_id
        assert await entries(store, session_id) == {(gateway.gateway.instance_id, opener_id)}  # type: ignore[union-attr]
        gated.gate.set()
        seen += await collect_until_complete(opener, session_id)
        await assert_nothing_more(intruder)  # none of the session leaked to the other app
    assert seen == await logged(store, session_id)


async def test_a_completed_session_replays_to_any_number_of_readers(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=1, after=1)
    gated.gate.set()
    await start_worker([gated.agent])
    gateway = await start_gateway(settings.model_copy(update={"max_viewers_per_session": 1}))
    async with viewer(gateway) as (opener, _):
        await send(opener, judgement_message(["gated"]))
        seen = await receive(opener, 1)
        seen += await collect_until_complete(opener, seen[0]["session_id"])
    session_id = seen[0]["session_id"]
    # Nothing more is published for it: reading it is not following it, and not bounded.
    async with viewer(gateway) as (a, _), viewer(gateway) as (b, _):
        for ws in (a, b):
            await send(ws, resume(session_id, 0))
            assert await receive(ws, len(seen)) == seen
            await assert_nothing_more(ws)


# -- dead instances ----------------------------------------------------------------------------------


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_dsn,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "FIXED_SECRET": SECRET,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


async def test_viewers_of_a_killed_instance_stop_counting_after_their_lease(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    leased = settings.model_copy(update={"max_viewers_per_session": 2, "viewer_lease_s": 1.0})
    gated = Gated("gated", before=2, after=5)
    await start_worker([gated.agent])
    live = await start_gateway(leased)
    doomed = await asyncio.to_thread(
        spawn_gateway, _env(leased, MAX_VIEWERS_PER_SESSION="2", VIEWER_LEASE_S="1"), "warning"
    )
    assert doomed.process is not None
    try:
        async with viewer(live) as (opener, opener_id):
            seen = await open_session(opener, "gated", 2)
            session_id = seen[0]["session_id"]
            async with viewer(doomed) as (lost, _):
                await send(lost, resume(session_id, 0))
                assert await receive(lost, 3) == seen
                assert len(await entries(store, session_id)) == 2
                os.kill(doomed.process.pid, signal.SIGKILL)
                await asyncio.to_thread(doomed.process.wait, 10)
            # Its viewer holds a place only until its lease runs out (nobody renews it).
            async with viewer(live) as (newcomer, newcomer_id):

                async def admitted() -> bool:
                    await send(newcomer, resume(session_id, 0))
                    reply = await recv(newcomer)
                    if reply.get("code") == "too_many_viewers":
                        return False
                    assert reply == seen[0]
                    return True

                await eventually(admitted, timeout=10, what="the dead instance's viewer to lapse")
                assert await receive(newcomer, 2) == seen[1:]
                instance = live.gateway.instance_id  # type: ignore[union-attr]
                assert await entries(store, session_id) == {(instance, opener_id), (instance, newcomer_id)}
                # The live instance's own leases are renewed: still its viewers well past one lease.
                await asyncio.sleep(2.5)
                assert await entries(store, session_id) == {(instance, opener_id), (instance, newcomer_id)}
                gated.gate.set()
                rest = await collect_until_complete(newcomer, session_id)
                assert await collect_until_complete(opener, session_id) == rest
        assert seen + rest == await logged(store, session_id)
    finally:
        await asyncio.to_thread(stop_process, doomed.process)


async def test_a_stopping_instance_removes_its_viewers_at_once(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    live = await start_gateway(settings)
    stopping = await asyncio.to_thread(spawn_gateway, _env(settings), "warning")  # leases of 30 s
    assert stopping.process is not None
    try:
        async with viewer(live) as (opener, opener_id):
            seen = await open_session(opener, "gated", 2)
            session_id = seen[0]["session_id"]
            async with viewer(stopping) as (leaving, _):
                await send(leaving, resume(session_id, 0))
                assert await receive(leaving, 3) == seen
                assert len(await entries(store, session_id)) == 2
                stopping.process.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(stopping.process.wait, 10) in (0, -signal.SIGTERM)
            # Gone with it, long before its lease would have run out.
            instance = live.gateway.instance_id  # type: ignore[union-attr]
            assert await entries(store, session_id) == {(instance, opener_id)}
            gated.gate.set()
            seen += await collect_until_complete(opener, session_id)
        assert seen == await logged(store, session_id)
    finally:
        await asyncio.to_thread(stop_process, stopping.process)


async def test_a_viewer_dropped_from_redis_is_registered_again_and_misses_nothing(
    settings: Settings,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    store: Store,
    redis_client: Redis,
) -> None:
    """What happens to an instance cut off from Redis for longer than the lease, whose
    viewers another instance pruned: its renewal registers them again, and they replay."""
    leased = settings.model_copy(update={"viewer_lease_s": 0.6})
    gated = Gated("gated", before=2, after=10)
    await start_worker([gated.agent])
    first, second = await start_gateway(leased), await start_gateway(leased)
    async with viewer(first) as (opener, _), viewer(second) as (follower, follower_id):
        seen = await open_session(opener, "gated", 2)
        session_id = seen[0]["session_id"]
        await send(follower, resume(session_id, 0))
        follower_seen = await receive(follower, 3)
        instance = second.gateway.instance_id  # type: ignore[union-attr]
        viewers_key = Keys(settings.redis_key_prefix).session(SessionId(session_id)).viewers
        assert await redis_client.zrem(viewers_key, f"{instance} {follower_id}") == 1
        gated.gate.set()  # logged while the follower's instance is not notified
        seen += await collect_until_complete(opener, session_id)
        follower_seen += await collect_until_complete(follower, session_id)
        assert (instance, follower_id) in await entries(store, session_id)
    assert follower_seen == seen == await logged(store, session_id)
