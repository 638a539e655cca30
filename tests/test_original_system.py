"""The whole original system around the gateway: its frontend's frames in, its pub/sub-era
backend (``PSUBSCRIBE gateway:requests:*``, ``agent_response`` answers) serving MELCHIOR
under its original UUID through ``pubsub-bridge``, the demo agents answering for the
other two UUIDs through their aliases."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from magi_gateway.agents.demo import demo_agents
from magi_gateway.settings import Settings
from magi_gateway.worker.pubsub_bridge import PubSubBridge
from magi_gateway.worker.runner import Worker

from ._support import GatewayHandle, recv, running_bridges, send
from .test_original_clients import (
    BALTHASAR,
    CASPER,
    MELCHIOR,
    assert_agent_lifecycle,
    by_agent,
    connect,
    frontend_judgement,
    read_until_complete,
    verdict_of,
)

PIECES = [
    "MELCHIOR (the original backend) weighs it. ",
    "Having weighed it: <deci",
    "sion>NEGATIVE</decision>",
]


async def original_backend(redis_url: str, prefix: str, ready: asyncio.Event) -> None:
    """The original listener, as it was written: one Celery-like answer per agent."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe(f"{prefix}gateway:requests:*")
        ready.set()
        async for item in pubsub.listen():
            request = json.loads(item["data"])
            channel = f"{prefix}gateway:responses:{request['session_id']}"
            for agent in request["agents"]:
                base = {
                    "type": "agent_response",
                    "session_id": request["session_id"],
                    "request_id": request.get("request_id"),
                    "agent_id": agent["agent_id"],
                }
                await client.publish(
                    channel, json.dumps({**base, "status": "processing", "timestamp": time.time()})
                )
                for piece in PIECES:
                    streaming = {**base, "status": "streaming", "content": piece, "timestamp": time.time()}
                    await client.publish(channel, json.dumps(streaming))
                await client.publish(
                    channel, json.dumps({**base, "status": "completed", "timestamp": time.time()})
                )
    finally:
        await pubsub.aclose()
        await client.aclose()


@pytest.fixture
async def backend(redis_url: str, settings: Settings, key_prefix: str) -> AsyncIterator[Settings]:
    """The original backend listening, and the settings of a bridge that reaches it."""
    bridged = settings.model_copy(
        update={"pubsub_channel_prefix": f"{key_prefix}:", "pubsub_agents": MELCHIOR}
    )
    ready = asyncio.Event()
    task = asyncio.create_task(original_backend(redis_url, bridged.pubsub_channel_prefix, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield bridged
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_original_frontend_and_backend_with_the_gateway_between(
    gateway: GatewayHandle, backend: Settings, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await start_worker(demo_agents(delay_s=0.0))
    async with running_bridges(lambda: PubSubBridge([MELCHIOR], backend)) as start_bridge:
        await start_bridge()
        ws = await connect(gateway)
        try:
            request = frontend_judgement("Shall we have tea?")
            await send(ws, request)
            assert (await recv(ws))["type"] == "message_received"
            received = await read_until_complete(ws)
        finally:
            await ws.close()
    agents = by_agent(received)
    for responses in agents.values():
        assert_agent_lifecycle(responses)
        assert {r["request_id"] for r in responses} == {request["request_id"]}
    # MELCHIOR's answer is the backend's, streamed once (its judgement is that same text).
    melchior = [r["content"] for r in agents[MELCHIOR] if r["status"] == "streaming"]
    assert melchior == PIECES
    assert {a: verdict_of(r) for a, r in agents.items()} == {
        MELCHIOR: "NEGATIVE",
        BALTHASAR: "POSITIVE",
        CASPER: "POSITIVE",
    }
    assert received[-1]["data"]["verdict"] == "approve"
    assert received[-1]["data"]["results"][MELCHIOR] == {"result_code": 0, "decision": "reject"}
