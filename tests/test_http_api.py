"""The ``/v1`` HTTP API against live gateways, a real Redis and real workers: SSE streams,
resumes on another instance, the 202 mode, snapshots, cancels, auth and validation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from magi_gateway.agents import demo_agents
from magi_gateway.core.jwt_auth import mint
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._sse import Event, auth, collect, events
from ._support import APPID, SECRET, GatewayHandle, assert_clean_error, make_token, recv, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]
DEMO = ["melchior", "balthasar", "casper"]
SSE = {"Accept": "text/event-stream"}


def body(agent_ids: list[str], user_input: str = "Shall we have tea?", **extra: Any) -> dict[str, Any]:
    return {"agent_ids": agent_ids, "data": {"user_input": user_input}, **extra}


async def stored_log(settings: Settings, session_id: str) -> list[tuple[int, bytes, bytes]]:
    """The session's log as Redis holds it."""
    from magi_gateway.redis.client import connect

    redis = connect(settings)
    try:
        return await Store(redis, Keys(settings.redis_key_prefix)).read_log(session_id, 1)  # type: ignore[arg-type]
    finally:
        await redis.aclose()


def assert_events_are_the_log(got: list[Event], log: list[tuple[int, bytes, bytes]]) -> None:
    """SSE events are the log's messages: id = seq, event = type, data = the frame, byte for byte."""
    assert [(e.id, e.event, e.data) for e in got] == [(seq, kind.decode(), frame) for seq, kind, frame in log]


async def test_post_judgement_streams_the_session_as_sse(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with (
        httpx.AsyncClient(base_url=gateway.http, timeout=20) as client,
        client.stream("POST", "/v1/judgements", json=body(DEMO), headers={**SSE, **auth()}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers.get("content-encoding", "identity") == "identity"
        got = await collect(response)
    assert [e.id for e in got] == list(range(1, len(got) + 1))
    assert got[0].event == "agent_judgement_accepted"
    assert got[-1].event == "agent_judgement_complete"
    assert all(e.event == e.message["type"] and e.id == e.message["seq"] for e in got)
    assert sorted(e.message["agent_id"] for e in got if e.event == "agent_judgement_final") == sorted(DEMO)
    assert got[-1].message["data"]["verdict"] == "approve"
    assert_events_are_the_log(got, await stored_log(gateway.gateway.settings, got[0].message["session_id"]))  # type: ignore[union-attr]
