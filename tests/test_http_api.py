"""The ``/v1`` HTTP API against live gateways, a real Redis and real workers: SSE streams,
resumes on another instance, the 202 mode, snapshots, cancels, auth and validation."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from magi_gateway import Context, Judgement, agent
from magi_gateway.agents import demo_agents
from magi_gateway.core.jwt_auth import mint
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._sse import Event, auth, collect, events
from ._support import APPID, SECRET, GatewayHandle, assert_clean_error, make_token, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]
DEMO = ["melchior", "balthasar", "casper"]
SSE = {"Accept": "text/event-stream"}


def body(agent_ids: list[str], user_input: str = "Shall we have tea?", **extra: Any) -> dict[str, Any]:
    return {"agent_ids": agent_ids, "data": {"user_input": user_input}, **extra}


async def stored_log(settings: Settings, session_id: str) -> list[tuple[int, bytes, bytes]]:
    """The session's log as Redis holds it."""
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


def gated_agent(name: str, gate: asyncio.Event, before: int = 3, after: int = 3) -> Any:
    """An agent that thinks ``before`` times, waits for ``gate``, thinks ``after`` times, approves."""

    @agent(name)
    async def gated(user_input: str, ctx: Context) -> Judgement:
        for i in range(before):
            await ctx.think(f"{name} before {i}")
        await gate.wait()
        for i in range(after):
            await ctx.think(f"{name} after {i}")
        return Judgement(f"{name} agrees", decision="approve")

    return gated


async def read_until(stream: AsyncIterator[Event], stop: Callable[[Event], bool]) -> list[Event]:
    """Events with data from ``stream`` up to the first for which ``stop`` holds (or the end)."""
    got: list[Event] = []
    async for event in stream:
        if event.data:
            got.append(event)
            if stop(event):
                break
    return got


async def test_resume_by_last_event_id_on_another_instance_gets_exactly_the_rest(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    first, second = await start_gateway(settings), await start_gateway(settings)
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    async with httpx.AsyncClient(timeout=20) as client:
        async with client.stream(
            "POST", f"{first.http}/v1/judgements", json=body(["gated"]), headers={**SSE, **auth()}
        ) as response:
            head = await read_until(events(response), lambda e: e.data.count(b"before 1") > 0)
        # The client's connection dropped mid-session; it resumes on the other instance.
        session_id = head[0].message["session_id"]
        gate.set()
        headers = {"Last-Event-ID": str(head[-1].id), **auth()}
        async with client.stream(
            "GET", f"{second.http}/v1/sessions/{session_id}/events", headers=headers
        ) as response:
            assert response.status_code == 200
            rest = await collect(response)
    assert rest[0].id == head[-1].id + 1  # type: ignore[operator]
    assert rest[-1].event == "agent_judgement_complete"
    assert_events_are_the_log(head + rest, await stored_log(settings, session_id))


async def test_sse_carries_the_websocket_frames_byte_for_byte(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        accepted = await client.post("/v1/judgements", json=body(DEMO), headers=auth())
        assert accepted.status_code == 202
        session_id = accepted.json()["session_id"]
        assert accepted.json()["seq"] == 1
        async with client.stream(
            "GET", f"/v1/sessions/{session_id}/events?last_seq=0", headers=auth()
        ) as response:
            got = await collect(response)
    ws = await gateway.connect()
    try:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 0})
        frames: list[bytes] = []
        while not frames or b'"agent_judgement_complete"' not in frames[-1]:
            raw = await asyncio.wait_for(ws.recv(), 10)
            frames.append(raw.encode() if isinstance(raw, str) else raw)
    finally:
        await ws.close()
    assert [e.data for e in got] == frames
    assert [e.id for e in got] == [orjson.loads(f)["seq"] for f in frames]


async def test_a_stream_of_a_completed_session_replays_it_and_ends(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        async with client.stream(
            "POST", "/v1/judgements", json=body(DEMO), headers={**SSE, **auth()}
        ) as response:
            everything = await collect(response)
        session_id = everything[0].message["session_id"]
        last = everything[-1].id
        async with client.stream(
            "GET", f"/v1/sessions/{session_id}/events?last_seq=3", headers=auth()
        ) as response:
            assert [e.id for e in await collect(response)] == list(range(4, last + 1))  # type: ignore[operator]
        # At the end already: an empty stream that ends at once.
        headers = {"Last-Event-ID": str(last), **auth()}
        async with client.stream("GET", f"/v1/sessions/{session_id}/events", headers=headers) as response:
            assert response.status_code == 200
            assert await collect(response) == []
        head = await client.head(f"/v1/sessions/{session_id}/events", headers=auth())
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        snapshot = (await client.get(f"/v1/sessions/{session_id}", headers=auth())).json()
    assert snapshot["completed"] is True
    assert snapshot["verdict"] == "approve"
    assert snapshot["last_seq"] == last
    assert snapshot["pending"] == []
    assert snapshot["agent_ids"] == DEMO
    assert snapshot["finals"] == {a: {"result_code": 0, "decision": "approve"} for a in DEMO}


async def test_the_same_request_id_answers_with_the_same_session(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        first = await client.post("/v1/judgements", json=body(DEMO, request_id="r-1"), headers=auth())
        again = await client.post("/v1/judgements", json=body(DEMO, request_id="r-1"), headers=auth())
        async with client.stream(
            "POST", "/v1/judgements", json=body(DEMO, request_id="r-1"), headers={**SSE, **auth()}
        ) as response:
            streamed = await collect(response)
    assert first.status_code == again.status_code == 202
    assert again.json()["session_id"] == first.json()["session_id"]
    assert streamed[0].message["session_id"] == first.json()["session_id"]
    assert streamed[0].id == 1
    assert streamed[0].message["request_id"] == "r-1"
    assert streamed[-1].event == "agent_judgement_complete"


async def test_cancel_snapshot_and_agents(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        agents = (await client.get("/v1/agents", headers=auth())).json()
        assert agents["type"] == "agents"
        assert [a["agent_id"] for a in agents["agents"]] == ["gated"]
        session_id = (
            await client.post("/v1/judgements", json=body(["gated", "nobody"]), headers=auth())
        ).json()["session_id"]
        async with client.stream("GET", f"/v1/sessions/{session_id}/events", headers=auth()) as response:
            stream = events(response)
            await read_until(stream, lambda e: b"before 2" in e.data)
            running = (await client.get(f"/v1/sessions/{session_id}", headers=auth())).json()
            assert running["completed"] is False
            assert running["verdict"] is None
            assert running["pending"] == ["gated"]
            assert running["finals"] == {"nobody": {"result_code": 3}}
            cancelled = await client.post(f"/v1/sessions/{session_id}/cancel", headers=auth())
            assert cancelled.status_code == 200
            assert cancelled.json() == {"session_id": session_id, "cancelled": True}
            rest = await read_until(stream, lambda e: False)
        again = await client.post(f"/v1/sessions/{session_id}/cancel", headers=auth())
    finals = {e.message["agent_id"]: e.message for e in rest if e.event == "agent_judgement_final"}
    assert finals["gated"]["result_code"] == 4
    assert rest[-1].event == "agent_judgement_complete"
    assert again.status_code == 409
    assert_clean_error(again.json(), "session_completed")
    gate.set()


async def test_openapi_lists_every_route(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        response = await client.get("/v1/openapi.json", headers=auth())
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert gateway.app is not None
    routes = {
        (route.path, method.lower())
        for route in gateway.app.routes
        if isinstance(route, Route) and route.path.startswith("/v1/") and route.path != "/v1/token"
        for method in (route.methods or ()) - {"HEAD"}
    }
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == routes
    assert len(routes) == 6
    # Every reference resolves.
    text = response.text
    for name in document["components"]["schemas"]:
        assert f"#/components/schemas/{name}" in text
    for reference in set(re.findall(r'"#/components/schemas/(\w+)"', text)):
        assert reference in document["components"]["schemas"]


async def test_curl_streams_the_session(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed here")
    await start_worker(demo_agents(delay_s=0.01))
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-N",
        "-H",
        "Accept: text/event-stream",
        "-H",
        "Content-Type: application/json",
        "-d",
        orjson.dumps(body(DEMO)).decode(),
        f"{gateway.http}/v1/judgements?appid={APPID}&token={make_token()}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    blocks = [b for b in out.decode().split("\n\n") if b.strip()]
    ids = [int(b.split("\n")[0].removeprefix("id: ")) for b in blocks]
    assert ids == list(range(1, len(blocks) + 1))
    assert blocks[-1].split("\n")[1] == "event: agent_judgement_complete"
    assert orjson.loads(blocks[-1].split("\n")[2].removeprefix("data: "))["data"]["verdict"] == "approve"


async def test_a_jwt_bearer_token_authenticates(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    token = mint(APPID, SECRET, now=time.time(), ttl_s=60)
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        bearer = {"Authorization": f"Bearer {token}"}
        accepted = await client.post("/v1/judgements", json=body(DEMO), headers=bearer)
        assert accepted.status_code == 202
        session_id = accepted.json()["session_id"]
        async with client.stream("GET", f"/v1/sessions/{session_id}/events", headers=bearer) as response:
            got = await collect(response)
    assert got[-1].event == "agent_judgement_complete"
