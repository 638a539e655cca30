"""Per-appid session limits across gateway instances (#12 item 3): two gateways, one Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from magi_gateway import Context, Judgement, agent
from magi_gateway.redis.keys import Keys
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import GatewayHandle, assert_clean_error, judgement_message, recv, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


@agent("patient")
async def patient(user_input: str, ctx: Context) -> Judgement:
    """Thinks once, then waits for its deadline or a cancel."""
    await ctx.think("waiting")
    await asyncio.sleep(60)
    return Judgement("never", decision="abstain")


async def open_session(handle: GatewayHandle, appid: str) -> tuple[Any, dict[str, Any]]:
    """A connection of ``appid`` and the first reply to its judgement (accepted or an error)."""
    ws = await handle.connect(appid)
    await send(ws, judgement_message(["patient"]))
    return ws, await recv(ws)


async def test_running_sessions_per_appid_are_capped_across_instances(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, redis_client: Redis
) -> None:
    capped = settings.model_copy(update={"max_sessions_per_app": 2})
    first, second = await start_gateway(capped), await start_gateway(capped)
    await start_worker([patient], grace_s=0.2)
    opened: list[Any] = []
    try:
        ws1, one = await open_session(first, "app-x")
        ws2, two = await open_session(second, "app-x")
        opened += [ws1, ws2]
        assert one["type"] == two["type"] == "agent_judgement_accepted"
        ws3, refused = await open_session(second, "app-x")
        opened.append(ws3)
        assert_clean_error(refused, "too_many_sessions")
        ws4, other = await open_session(first, "app-y")  # another tenant is not affected
        opened.append(ws4)
        assert other["type"] == "agent_judgement_accepted"

        # A session that ends stops counting: cancel one, then there is room again.
        await send(ws1, {"type": "cancel", "session_id": one["session_id"]})
        while (await recv(ws1))["type"] != "agent_judgement_complete":
            pass
        await send(ws3, judgement_message(["patient"]))
        assert (await recv(ws3))["type"] == "agent_judgement_accepted"
        running = await redis_client.zcard(Keys(settings.redis_key_prefix).app_running("app-x"))
        assert running == 2
    finally:
        for ws in opened:
            await ws.close()


async def test_session_creation_rate_per_appid_holds_across_instances(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    limited = settings.model_copy(update={"max_sessions_per_s_per_app": 3})
    first, second = await start_gateway(limited), await start_gateway(limited)
    await start_worker([patient], grace_s=0.2)
    sockets = [await handle.connect("app-x") for handle in (first, second) * 5]
    try:
        for ws in sockets:
            await send(ws, judgement_message(["patient"]))
        replies = [await recv(ws) for ws in sockets]
    finally:
        for ws in sockets:
            await ws.close()
    accepted = [r for r in replies if r.get("type") == "agent_judgement_accepted"]
    refused = [r for r in replies if "error" in r]
    for reply in refused:
        assert_clean_error(reply, "rate_limited")
    # Ten at once: three per one-second window (two windows if the burst straddles one).
    assert 3 <= len(accepted) <= 6, replies
    assert len(accepted) + len(refused) == 10


@agent("prompt")
async def prompt(user_input: str, ctx: Context) -> Judgement:
    """Answers at once."""
    await ctx.think("thinking")
    return Judgement("done", decision="approve")


async def test_a_session_stops_counting_before_its_completion_is_seen(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, redis_client: Redis
) -> None:
    # A client that sees a session complete may open its next one at once: by then the
    # finished one no longer counts against MAX_SESSIONS_PER_APP, whether its worker or a
    # cancel completed it (it once counted until the worker's batched finish, and a
    # cancelled one until a later round trip). With a limit of one, one judgement after
    # another never meets too_many_sessions.
    capped = settings.model_copy(update={"max_sessions_per_app": 1})
    handle = await start_gateway(capped)
    await start_worker([prompt, patient], settings=capped)
    running = Keys(settings.redis_key_prefix).app_running("app-z")
    async with await handle.connect("app-z") as ws:
        for turn in range(12):
            cancel = turn % 3 == 2  # the gateway's cancel path completes it, not the worker
            await send(ws, judgement_message(["patient" if cancel else "prompt"]))
            accepted = await recv(ws)
            assert accepted.get("type") == "agent_judgement_accepted", (turn, accepted)
            if cancel:
                await send(ws, {"type": "cancel", "session_id": accepted["session_id"]})
            while (message := await recv(ws)).get("type") != "agent_judgement_complete":
                assert "error" not in message, message
            assert await redis_client.zcard(running) == 0, turn
