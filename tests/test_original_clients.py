"""The original system's frontend and CLI client against a live gateway, with their exact
frames: the judgement in their form is answered in ``agent_response`` shapes (with ``seq``,
so ``resume`` works, on another instance too), ``message_received`` acknowledges every
message, ``get_voters``, ``/ws/health``, and the ``GATEWAY_*`` setting names."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import websockets

from magi_gateway import Context, Judgement, agent
from magi_gateway.agents.bench import BenchAgent
from magi_gateway.agents.demo import demo_agents
from magi_gateway.core.dialect import OriginalReplies
from magi_gateway.core.ids import AppId, ConnectionId, SessionId
from magi_gateway.embedded import free_port
from magi_gateway.server.dialect import OriginalTranslation
from magi_gateway.server.outbox import Connection
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import eventually
from ._support import SECRET, GatewayHandle, make_token, recv, send, stop_process
from .agents_for_tests import refuser

MELCHIOR = "d37c1cc8-bcc4-4b73-9f49-a93a30971f2c"
BALTHASAR = "6634d0ec-d700-4a92-9066-4960a0f11927"
CASPER = "89cbe912-25d0-47b0-97da-b25622bfac0d"
TRIO = [MELCHIOR, BALTHASAR, CASPER]
FRONTEND_APPID = "b75fce6f-e8af-4207-9c32-f8166afb4520"

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


def frontend_judgement(
    question: str, agents: list[str] = TRIO, request_id: str | None = None
) -> dict[str, Any]:
    """The original frontend's judgement frame, field for field."""
    return {
        "type": "agent_judgement",
        "request_id": request_id or str(uuid.uuid4()),
        "request": f"<user_input>\n{question}\n</user_input>\n<response>\n\n</response>",
        "timestamp": time.time(),
        "agents": [{"agent_id": a} for a in agents],
    }


async def connect(handle: GatewayHandle) -> websockets.ClientConnection:
    ws = await websockets.connect(handle.ws_url(FRONTEND_APPID, make_token(FRONTEND_APPID)))
    assert (await recv(ws))["type"] == "connection_established"
    return ws


async def read_until_complete(ws: websockets.ClientConnection) -> list[dict[str, Any]]:
    """Frames up to the session's ``agent_judgement_complete``."""
    received = []
    while True:
        message = await recv(ws, 20)
        received.append(message)
        if message.get("type") == "agent_judgement_complete":
            return received


def by_agent(frames: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    agents: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        if frame.get("type") == "agent_response":
            agents.setdefault(frame["agent_id"], []).append(frame)
    return agents


def verdict_of(responses: list[dict[str, Any]]) -> str | None:
    """What the frontend concludes: the decision tag in the concatenated content."""
    text = "".join(r.get("content", "") for r in responses if r["status"] == "streaming")
    if "<decision>POSITIVE</decision>" in text:
        return "POSITIVE"
    if "<decision>NEGATIVE</decision>" in text:
        return "NEGATIVE"
    return None


def assert_agent_lifecycle(responses: list[dict[str, Any]], last: str = "completed") -> None:
    """processing once, streaming chunks, then one ``last`` status (the frontend's order)."""
    statuses = [r["status"] for r in responses]
    assert statuses[0] == "processing"
    assert statuses.count("processing") == 1
    assert statuses[-1] == last
    assert set(statuses[1:-1]) <= {"streaming"}
    seqs = [r["seq"] for r in responses]
    assert seqs == sorted(seqs)


async def test_a_frontend_judgement_is_answered_in_the_original_shapes(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.0))
    ws = await connect(gateway)
    try:
        request = frontend_judgement("Is this risky plan worth it?")
        await send(ws, request)
        assert await recv(ws) == {"type": "message_received", "message_type": "agent_judgement"}
        received = await read_until_complete(ws)
    finally:
        await ws.close()
    agents = by_agent(received)
    assert sorted(agents) == sorted(TRIO)  # the ids the client used, not the aliases' agents
    session_id = received[0]["session_id"]
    for responses in agents.values():
        assert_agent_lifecycle(responses)
        for response in responses:
            assert response["session_id"] == session_id
            assert response["request_id"] == request["request_id"]
            assert isinstance(response["timestamp"], float)
            assert set(response) <= {
                "type",
                "session_id",
                "request_id",
                "agent_id",
                "status",
                "timestamp",
                "content",
                "seq",
            }
        assert any(r["status"] == "streaming" and r["content"] for r in responses[:-2])  # the thinking
    # MELCHIOR minds "risky"; the others approve.
    assert {a: verdict_of(r) for a, r in agents.items()} == {
        MELCHIOR: "NEGATIVE",
        BALTHASAR: "POSITIVE",
        CASPER: "POSITIVE",
    }
    complete = received[-1]
    assert complete["data"]["verdict"] == "approve"
    assert sorted(complete["data"]["results"]) == sorted(TRIO)
    # Every stored message reached the client, in seq order, with no gap.
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(seqs)
    assert sorted(set(seqs)) == list(range(1, seqs[-1] + 1))


async def test_a_failing_agent_answers_error(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker([refuser])
    ws = await connect(gateway)
    try:
        await send(ws, frontend_judgement("Tea?", ["refuser", "nobody"]))
        assert (await recv(ws))["type"] == "message_received"
        agents = by_agent(await read_until_complete(ws))
    finally:
        await ws.close()
    assert_agent_lifecycle(agents["refuser"], last="error")
    assert agents["refuser"][-1]["error"] == "nope"
    assert_agent_lifecycle(agents["nobody"], last="error")
    assert "No live worker" in agents["nobody"][-1]["error"]


async def test_resume_on_another_instance_keeps_the_dialect(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    first, second = await start_gateway(settings), await start_gateway(settings)
    await start_worker(demo_agents(delay_s=0.01))
    ws = await connect(first)
    try:
        await send(ws, frontend_judgement("Shall we have tea?"))
        assert (await recv(ws))["type"] == "message_received"
        seen = [await recv(ws)]
        while seen[-1]["status"] != "completed":  # up to a message's last frame (see README)
            seen.append(await recv(ws))
    finally:
        await ws.close()
    session_id, last_seq = seen[0]["session_id"], seen[-1]["seq"]
    ws = await connect(second)
    try:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": last_seq})
        assert await recv(ws) == {"type": "message_received", "message_type": "resume"}
        rest = await read_until_complete(ws)
    finally:
        await ws.close()
    assert all(m["seq"] > last_seq for m in rest)
    assert all(m["type"] == "agent_response" for m in rest[:-1])
    agents = by_agent(seen + rest)
    assert sorted(agents) == sorted(TRIO)
    for responses in agents.values():
        assert_agent_lifecycle(responses)
        assert verdict_of(responses) == "POSITIVE"


async def test_get_voters(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.0))
    ws = await connect(gateway)
    try:
        await send(ws, {"type": "get_voters", "user_input": "Tea?", "request_id": "v-1"})
        assert await recv(ws) == {"type": "message_received", "message_type": "get_voters"}
        voters = await recv(ws)
    finally:
        await ws.close()
    assert voters["type"] == "get_voters_response"
    assert (voters["request_id"], voters["status"]) == ("v-1", "success")
    assert {v["agent_id"]: v["name"] for v in voters["voters"]} == {
        MELCHIOR: "MELCHIOR",
        BALTHASAR: "BALTHASAR",
        CASPER: "CASPER",
    }


async def test_acknowledgements_and_invalid_json(gateway: GatewayHandle) -> None:
    ws = await connect(gateway)
    try:
        # A seed-protocol client sees no change: no acknowledgement, the seed error.
        await ws.send("{not json")
        assert await recv(ws) == {"error": "Invalid JSON", "code": "invalid_json"}
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        # Once it spoke the original dialect, the connection is answered as the original gateway did.
        await send(ws, {"type": "get_voters", "user_input": "Tea?"})
        assert (await recv(ws))["type"] == "message_received"
        assert (await recv(ws))["voters"] == []
        await ws.send("{not json")
        assert await recv(ws) == {"error": "Invalid JSON format", "code": "invalid_json"}
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "message_received", "message_type": "ping"}
        assert await recv(ws) == {"type": "pong"}
    finally:
        await ws.close()


@agent(MELCHIOR)
async def original_melchior(user_input: str, ctx: Context) -> Judgement:
    """An agent served under MELCHIOR's original UUID (as a pub/sub-era backend may be)."""
    await ctx.think("the original MELCHIOR")
    return Judgement("served under its own id", decision="reject")


async def test_an_alias_does_not_hide_an_agent_served_under_that_id(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker([original_melchior, *demo_agents(delay_s=0.0)])
    ws = await connect(gateway)
    try:
        await send(ws, frontend_judgement("Shall we have tea?", [MELCHIOR, BALTHASAR]))
        assert (await recv(ws))["type"] == "message_received"
        received = await read_until_complete(ws)
    finally:
        await ws.close()
    agents = by_agent(received)
    assert "the original MELCHIOR" in [r.get("content") for r in agents[MELCHIOR]]
    assert verdict_of(agents[MELCHIOR]) == "NEGATIVE"
    assert verdict_of(agents[BALTHASAR]) == "POSITIVE"  # the demo agent, through its alias
    assert sorted(received[-1]["data"]["results"]) == sorted([MELCHIOR, BALTHASAR])


async def test_ws_health(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{gateway.http}/ws/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "healthy"}


@pytest.mark.parametrize("ws_impl", ["fast", "websockets"])
async def test_gateway_setting_names(settings: Settings, start_worker: StartWorker, ws_impl: str) -> None:
    await start_worker(demo_agents(delay_s=0.0))
    redis = urlsplit(settings.redis_dsn)
    port = free_port()
    original = {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_REDIS_HOST": redis.hostname or "",
        "GATEWAY_REDIS_PORT": str(redis.port),
        "GATEWAY_REDIS_DB": redis.path.lstrip("/") or "0",
        "GATEWAY_SECRET": "magi-gateway-development-secret",
        "GATEWAY_CORS_ORIGINS": "http://frontend.example",
    }
    canonical = (
        "HOST",
        "PORT",
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "FIXED_SECRET",
        "CORS_ORIGINS",
    )
    env = {k: v for k, v in os.environ.items() if k not in canonical}
    env.update(original, REDIS_KEY_PREFIX=settings.redis_key_prefix, WS_IMPL=ws_impl)
    process = subprocess.Popen(
        [sys.executable, "-m", "magi_gateway", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    handle = GatewayHandle(port=port, process=process)
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                try:
                    if (await client.get(f"{handle.http}/readyz", timeout=2)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway never became ready"
                await asyncio.sleep(0.1)
            preflight = await client.options(
                f"{handle.http}/healthz",
                headers={"Origin": "http://frontend.example", "Access-Control-Request-Method": "GET"},
            )
            assert preflight.headers.get("access-control-allow-origin") == "http://frontend.example"
        token = make_token(FRONTEND_APPID, "magi-gateway-development-secret")
        url = handle.ws_url(FRONTEND_APPID, token)
        async with websockets.connect(url, origin="http://frontend.example") as ws:  # type: ignore[arg-type]
            assert (await recv(ws))["type"] == "connection_established"
            await send(ws, frontend_judgement("Shall we have tea?", [CASPER]))
            assert (await recv(ws))["type"] == "message_received"
            agents = by_agent(await read_until_complete(ws))
        assert verdict_of(agents[CASPER]) == "POSITIVE"
        # The test secret is not the gateway's: refused.
        async with websockets.connect(
            handle.ws_url(FRONTEND_APPID, make_token(FRONTEND_APPID, SECRET))
        ) as ws:
            assert (await recv(ws))["code"] == "auth_failed"
    finally:
        stop_process(process)


async def test_an_alias_a_worker_declares_overrides_the_setting(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    # agents.toml: `aliases = [MELCHIOR's UUID]` on casper; AGENT_ALIASES says melchior.
    melchior, _balthasar, casper = demo_agents(delay_s=0.0)
    casper.aliases = (MELCHIOR,)
    await start_worker([melchior, casper])
    ws = await connect(gateway)
    try:
        await send(ws, frontend_judgement("Shall we have tea?", [MELCHIOR]))
        assert (await recv(ws))["type"] == "message_received"
        received = await read_until_complete(ws)
    finally:
        await ws.close()
    contents = [r.get("content", "") for r in by_agent(received)[MELCHIOR]]
    assert any("CASPER-3" in text for text in contents)
    assert not any("MELCHIOR-1" in text for text in contents)


async def test_a_replay_in_the_dialect_waits_for_room_for_what_a_message_becomes(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    # A final becomes two frames: with room for one, a replay must wait (not close 1013).
    await start_worker([BenchAgent(chunks=3, chunk_bytes=50)])
    roomy = await start_gateway(settings)
    tight = await start_gateway(settings.model_copy(update={"max_outbound_messages": 8}))
    ws = await connect(roomy)
    try:
        await send(ws, frontend_judgement("Tea?", ["bench"]))
        assert (await recv(ws))["type"] == "message_received"
        live = await read_until_complete(ws)
    finally:
        await ws.close()
    final_seq = live[-2]["seq"]  # ... streaming (the judgement), completed, the complete
    assert [m.get("status") for m in live[-6:]] == ["streaming"] * 4 + ["completed", None]
    gateway = tight.gateway
    assert gateway is not None
    connection = gateway.connect(AppId(FRONTEND_APPID))  # a client that reads nothing for now
    for _ in range(2):  # with the greeting and the resume's acknowledgement: 4 of 8 frames queued
        connection.push(b'{"type":"filler"}', b"filler")
    # The replay's first page (4 messages: half the buffer) is 3 chunks and the final: 7
    # frames queued after the chunks, room for one; the final is two.
    resume = {"type": "resume", "session_id": live[0]["session_id"], "last_seq": final_seq - 4}
    gateway.receive(connection, orjson.dumps(resume))

    async def waiting() -> bool:
        return connection._room is not None or connection.outbox.close_reason is not None

    await eventually(waiting, what="the replay waiting for room")
    assert connection.outbox.close_reason is None
    queued = [orjson.loads(frame) for frame in connection.take()]
    assert queued[3] == {"type": "message_received", "message_type": "resume"}
    assert [m["status"] for m in queued[4:]] == ["streaming"] * 3
    connection.drained()  # the client read it all: the replay goes on

    async def rest() -> list[bytes]:
        return connection.take()

    replayed = [orjson.loads(frame) for frame in await eventually(rest, what="the replay")]
    while replayed[-1].get("type") != "agent_judgement_complete":
        connection.drained()
        replayed += [orjson.loads(frame) for frame in await eventually(rest, what="the replay")]
    untimed = [{k: v for k, v in m.items() if k != "timestamp"} for m in replayed]
    assert untimed == [{k: v for k, v in m.items() if k != "timestamp"} for m in live[-3:]]
    assert connection.outbox.close_reason is None
    gateway.disconnect(connection)


def test_a_damaged_stored_frame_is_skipped_not_fatal() -> None:
    connection = Connection(ConnectionId("c1"), AppId(FRONTEND_APPID), max_messages=8)
    dialect = OriginalReplies(SessionId("0123456789abcdef0123456789abcdef"), None, {"melchior": MELCHIOR})
    translation = OriginalTranslation(connection, dialect)
    assert translation(b"\xff not json", b"agent_judgement_stream") is False
    assert translation(b'{"seq": 3, "data": []}', b"agent_judgement_stream") is False
    assert connection.take() == []
    good = b'{"type":"agent_judgement_stream","session_id":"0123456789abcdef0123456789abcdef","seq":4,'
    good += b'"agent_id":"melchior","data":{"thinking":"hm"}}'
    assert translation(good, b"agent_judgement_stream") is True
    (sent,) = [orjson.loads(frame) for frame in connection.take()]
    assert (sent["agent_id"], sent["content"], sent["seq"]) == (MELCHIOR, "hm", 4)


async def test_every_viewer_of_an_original_session_gets_its_shapes(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    # The dialect belongs to the session: a second viewer (on another instance, here)
    # gets the same agent_response frames as the client that opened it, each in full.
    first, second = await start_gateway(settings), await start_gateway(settings)
    await start_worker(demo_agents(delay_s=0.02))
    opener, viewer = await connect(first), await connect(second)
    try:
        await send(opener, frontend_judgement("Shall we have tea?"))
        assert (await recv(opener))["type"] == "message_received"
        head = await recv(opener)  # the session is running: its id is known
        await send(viewer, {"type": "resume", "session_id": head["session_id"], "last_seq": 0})
        assert (await recv(viewer))["type"] == "message_received"
        opened = [head, *await read_until_complete(opener)]
        viewed = await read_until_complete(viewer)
    finally:
        await opener.close()
        await viewer.close()

    def untimed(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "timestamp"} for m in frames]

    assert untimed(viewed) == untimed(opened)
    for responses in by_agent(viewed).values():
        assert_agent_lifecycle(responses)
        assert verdict_of(responses) == "POSITIVE"
