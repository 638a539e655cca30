"""Workers serve tenants in turn (#12 item 3): one appid's backlog does not starve another's.

Deterministic, not timed: the requests are queued first, then one worker with one slot
serves them, and the test looks at the order in which it served the appids.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from magi_gateway import Context, Judgement, agent
from magi_gateway._util import now_ms
from magi_gateway.core.ids import AgentId, AppId
from magi_gateway.core.session import new_session_id
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker


async def queue(store: Store, appid: str, count: int) -> None:
    for _ in range(count):
        session_id = new_session_id()
        deadline = now_ms() + 60_000
        await store.create_session(session_id, AppId(appid), "no-gateway", [AgentId("fair")], deadline, None)
        await store.enqueue_request(session_id, AgentId("fair"), appid, deadline, AppId(appid))


async def serve_all(settings: Settings, served: list[str], total: int) -> None:
    @agent("fair")
    async def fair(user_input: str, ctx: Context) -> Judgement:
        served.append(ctx.appid)
        return Judgement("ok", decision="approve")

    worker = Worker([fair], settings, concurrency=1, burst=True)
    await asyncio.wait_for(worker.run(), 30)
    assert len(served) == total


async def test_a_backlog_of_one_appid_does_not_delay_another(settings: Settings, redis_client: Redis) -> None:
    store = Store(redis_client, Keys(settings.redis_key_prefix))
    await queue(store, "app-a", 12)  # a flood, queued first
    await queue(store, "app-b", 2)
    await queue(store, "app-c", 1)
    served: list[str] = []
    await serve_all(settings, served, 15)
    # In turn: app-b and app-c are served within the first rounds, not after the flood.
    assert served[:6].count("app-b") == 2, served
    assert "app-c" in served[:3], served
    assert served[-9:] == ["app-a"] * 9, served


async def test_one_appid_alone_is_served_in_order(settings: Settings, redis_client: Redis) -> None:
    store = Store(redis_client, Keys(settings.redis_key_prefix))
    await queue(store, "solo", 5)
    served: list[str] = []
    await serve_all(settings, served, 5)
    assert served == ["solo"] * 5
