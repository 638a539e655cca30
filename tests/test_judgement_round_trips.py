"""A judgement's Redis round trips: its agents' liveness kept a moment (``core.live_agents``),
its request_id claimed in the admission (``lua/admit.lua``), on a real gateway and Redis.

On one server a judgement of agents asked about less than ``LIVENESS_CACHE_S`` ago is one
round trip: admission (with the request_id's claim), creation and enqueue, pipelined.
What Redis sees is read with MONITOR (commands run inside scripts are left out).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from magi_gateway._util import now_ms
from magi_gateway.agents import demo_agents
from magi_gateway.core.errors import RateLimited, TooManySessions
from magi_gateway.core.ids import AgentId, AppId, InstanceId, SessionId
from magi_gateway.core.session import new_session_id
from magi_gateway.redis.intake import AppLimits, PendingIntake, RequestClaimed
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import APPID, GatewayHandle, assert_well_formed, judge

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]

APP = AppId("claims-app")
AGENTS = [AgentId("melchior"), AgentId("casper")]
TIMEOUT_MS = 30_000


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


async def loaded(store: Store) -> Store:
    """``store`` with its scripts loaded (a first opening meets NOSCRIPT and loads them)."""
    session_id, intake = opening(AppId("loader"))  # (not counted against APP's limits)
    await create(store, session_id, intake, None)
    await store.intake.enqueue(PendingIntake(new_session_id(), APP, (), "", 0), marked=False)
    return store


@pytest.fixture
async def store(redis_client: Redis, keys: Keys) -> Store:
    return await loaded(Store(redis_client, keys, retention_s=60))


async def commands_during(redis: Redis, action: Callable[[], Awaitable[object]]) -> list[str]:
    """The commands Redis ran (outside scripts) while ``action`` ran, in order."""
    marker = uuid.uuid4().hex
    async with redis.monitor() as monitor:
        await action()
        await redis.echo(marker)
        seen: list[str] = []
        while marker not in (seen[-1] if seen else ""):
            command = await asyncio.wait_for(monitor.next_command(), 10)
            if command.get("client_type") != "lua":
                seen.append(str(command["command"]))
    return seen[:-1]


def opening(appid: AppId = APP) -> tuple[SessionId, PendingIntake]:
    """A new session's id and its requests."""
    session_id = new_session_id()
    return session_id, PendingIntake(session_id, appid, tuple(AGENTS), "question", now_ms() + TIMEOUT_MS)


async def create(store: Store, session_id: SessionId, intake: PendingIntake, rid: str | None) -> bool:
    """Open the session in one round trip, claiming ``rid`` in its admission."""
    return await store.create_session(
        session_id,
        intake.appid,
        InstanceId("instance-1"),
        AGENTS,
        intake.deadline_ms,
        rid,
        intake=intake,
        enqueue=True,
        claim=None if rid is None else (rid, 60_000),
    )


async def test_a_request_id_named_already_opens_nothing_and_names_its_session(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    first, first_intake = opening()
    assert await create(store, first, first_intake, "rid-1") is True
    ttl = await redis_client.pttl(keys.idempotency(APP, "rid-1"))
    assert 0 < ttl <= 60_000
    assert await redis_client.get(keys.idempotency(APP, "rid-1")) == first.encode()

    second, second_intake = opening()
    with pytest.raises(RequestClaimed) as raised:
        await create(store, second, second_intake, "rid-1")
    assert raised.value.session_id == first
    # Nothing of the second was written: no keys, no deadline, no mark, no request.
    assert not await redis_client.exists(*keys.session(second).all())
    assert await redis_client.zscore(keys.deadlines, second) is None
    assert await redis_client.zscore(keys.app_running(APP), second) is None
    assert not await redis_client.hexists(keys.unqueued, second)
    for agent in AGENTS:
        entries = await redis_client.xrange(keys.requests(agent, APP))
        assert [fields[b"sid"] for _, fields in entries] == [first.encode()]
    # Another request_id, or none, opens as usual.
    third, third_intake = opening()
    assert await create(store, third, third_intake, "rid-2") is True
    fourth, fourth_intake = opening()
    assert await create(store, fourth, fourth_intake, None) is True


@pytest.mark.parametrize("limits", [AppLimits(max_running=1), AppLimits(max_per_s=1)])
async def test_a_refused_admission_binds_no_request_id(
    redis_client: Redis, keys: Keys, limits: AppLimits
) -> None:
    store = await loaded(Store(redis_client, keys, retention_s=60))
    store.app_limits = limits
    first, first_intake = opening()
    assert await create(store, first, first_intake, "ok") is True
    refused, refused_intake = opening()
    with pytest.raises((TooManySessions, RateLimited)):
        await create(store, refused, refused_intake, "refused")
    assert not await redis_client.exists(keys.idempotency(APP, "refused"))
    assert not await redis_client.exists(*keys.session(refused).all())


async def test_a_judgement_of_agents_known_live_is_one_round_trip(
    gateway: GatewayHandle, start_worker: StartWorker, redis_client: Redis, settings: Settings
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    keys = Keys(settings.redis_key_prefix)
    idem = keys.idempotency(AppId(APPID), "second")
    async with await gateway.connect() as ws:
        first = await judge(ws, ["casper"], request_id="first")  # counts casper's workers
        records = []

        async def second() -> None:
            records.append(await judge(ws, ["casper"], request_id="second"))

        seen = await commands_during(redis_client, second)
    assert_well_formed(first, ["casper"])
    assert_well_formed(records[0], ["casper"])
    session_id = records[0].messages[0]["session_id"]
    meta = keys.session(session_id).meta
    gateway_opening = [c for c in seen if idem in c or (meta in c and "agent_judgement_accepted" in c)]
    # One EVALSHA of the admission (naming the request_id's key), one of the creation.
    assert len(gateway_opening) == 2, gateway_opening
    assert all(c.startswith("EVALSHA") for c in gateway_opening), gateway_opening
    assert idem in gateway_opening[0]
    # No count of casper's workers, no read of the declared aliases, no claim of its own.
    assert not [c for c in seen if c.startswith("ZCOUNT") and keys.workers(AgentId("casper")) in c], seen
    assert not [c for c in seen if keys.agent_aliases in c and not c.startswith("EVALSHA")], seen


async def test_an_agent_without_a_worker_is_asked_about_every_time(
    gateway: GatewayHandle, start_worker: StartWorker, redis_client: Redis, settings: Settings
) -> None:
    # result_code 3 only from a fresh count; an agent whose first worker just started is
    # served at once, whatever was asked a moment before.
    keys = Keys(settings.redis_key_prefix)
    async with await gateway.connect() as ws:
        nobody = await judge(ws, ["casper"], request_id="before")
        assert nobody.finals["casper"]["result_code"] == 3
        await start_worker(demo_agents(delay_s=0.01))
        records = []

        async def again() -> None:
            records.append(await judge(ws, ["casper"], request_id="after"))

        seen = await commands_during(redis_client, again)
    assert records[0].finals["casper"]["result_code"] == 0
    assert [c for c in seen if c.startswith("ZCOUNT") and keys.workers(AgentId("casper")) in c]


async def test_without_the_cache_every_judgement_counts(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, redis_client: Redis
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"liveness_cache_s": 0}))
    await start_worker(demo_agents(delay_s=0.01))
    keys = Keys(settings.redis_key_prefix)
    async with await gateway.connect() as ws:
        await judge(ws, ["casper"])
        records = []

        async def again() -> None:
            records.append(await judge(ws, ["casper"]))

        seen = await commands_during(redis_client, again)
    assert_well_formed(records[0], ["casper"])
    assert [c for c in seen if c.startswith("ZCOUNT") and keys.workers(AgentId("casper")) in c]
