"""A ``/v1`` event stream across a Redis crash: it stays open (keepalives), then carries on
from where it was, with nothing lost and nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from magi_gateway.embedded import RedisServer
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._sse import Event, auth, events
from ._support import GatewayHandle
from .test_http_api import SSE, assert_events_are_the_log, body, gated_agent, read_until, stored_log

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


async def test_a_stream_rides_out_a_redis_crash(
    tmp_path: Path, settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    server = RedisServer(tmp_path / "redis", persistence=True, extra_args=("--appendfsync", "always"))
    server.start()
    try:
        settings = settings.model_copy(update={"redis_url": server.url, "sse_keepalive_s": 0.2})
        gateway = await start_gateway(settings)
        gate = asyncio.Event()
        await start_worker([gated_agent("gated", gate)], settings=settings)
        async with (
            httpx.AsyncClient(base_url=gateway.http, timeout=30) as client,
            client.stream(
                "POST", "/v1/judgements", json=body(["gated"]), headers={**SSE, **auth()}
            ) as response,
        ):
            stream = events(response)
            head = await read_until(stream, lambda e: b"before 2" in e.data)
            await asyncio.to_thread(server.kill)
            keepalives = 0
            async for event in stream:  # the stream stays open while Redis is down
                assert not event.data
                keepalives += event.comments.count("keepalive")
                if keepalives == 3:
                    break
            await asyncio.to_thread(server.restart)
            gate.set()
            rest: list[Event] = await read_until(stream, lambda e: e.event == "agent_judgement_complete")
        assert rest[-1].event == "agent_judgement_complete"
        assert_events_are_the_log(head + rest, await stored_log(settings, head[0].message["session_id"]))
    finally:
        await asyncio.to_thread(server.stop)
