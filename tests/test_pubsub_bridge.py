"""The bridge for pub/sub-era backends of the original system (``magi_gateway.worker.pubsub_bridge``).

The "original backend" here is written as the original one was: a listener doing
``PSUBSCRIBE gateway:requests:*`` that answers each request on
``gateway:responses:{session_id}`` with ``agent_response`` messages (``processing``, one
``streaming`` per chunk with the text in ``content``, the verdict as a ``<decision>`` tag
in it, then ``completed``), with plain redis commands. Each test gets its own channel
prefix, so tests cannot hear each other's requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from magi_gateway.core.ids import SessionId
from magi_gateway.core.pubsub_era import OriginalResponse, VerdictText, parse_original_response
from magi_gateway.redis.keys import Keys
from magi_gateway.settings import Settings
from magi_gateway.worker.pubsub_bridge import PubSubBridge

from ._support import GatewayHandle, assert_well_formed, judge, running_bridges, spawn_process, stop_process

AGENTS = ["sage", "seer", "scribe"]
SID = SessionId("cd" * 16)
#: What each agent streams; the tag is split across chunks, as a model's tokens may split it.
VERDICTS = {"sage": "POSITIVE", "seer": "NEGATIVE", "scribe": "POSITIVE"}


def contents(agent_id: str, question: str) -> list[str]:
    verdict = VERDICTS[agent_id]
    return [f"{agent_id} reads {question!r}. ", "Having weighed it: <deci", f"sion>{verdict}</decision>"]


StartBridge = Callable[..., Awaitable[PubSubBridge]]


@pytest.fixture
def bridge_settings(settings: Settings, key_prefix: str) -> Settings:
    return settings.model_copy(
        update={"pubsub_channel_prefix": f"{key_prefix}:", "pubsub_agents": ",".join(AGENTS)}
    )


@pytest.fixture
async def start_bridge(bridge_settings: Settings) -> AsyncIterator[StartBridge]:
    """Run bridges in this event loop; stopped at teardown, which checks they ended cleanly."""
    async with running_bridges(lambda **kwargs: PubSubBridge(AGENTS, bridge_settings, **kwargs)) as start:
        yield start


async def original_backend(
    redis_url: str, prefix: str, seen: list[tuple[str, dict[str, Any]]], ready: asyncio.Event
) -> None:
    """The original pub/sub listener: PSUBSCRIBE the requests, PUBLISH agent_response messages.

    The user input picks the behaviour: ``fail-agent`` answers with an ``agent_response``
    error, ``fail-request`` with an ``agent_judgement_response`` error, ``silent`` with
    ``processing`` only; anything else is judged.
    """
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe(f"{prefix}gateway:requests:*")
        ready.set()
        async for item in pubsub.listen():
            request = json.loads(item["data"])
            seen.append((item["channel"], request))
            session_id = request["session_id"]
            channel = f"{prefix}gateway:responses:{session_id}"
            question = request["data"]["user_input"]
            for agent in request["agents"]:
                await judge_as_original_agent(client, channel, request, agent["agent_id"], question)
    finally:
        await pubsub.aclose()
        await client.aclose()


async def judge_as_original_agent(
    client: aioredis.Redis, channel: str, request: dict[str, Any], agent_id: str, question: str
) -> None:
    """One agent's answers, as the original Celery tasks published them."""

    async def answer(status: str, **fields: Any) -> None:
        message = {
            "type": "agent_response",
            "session_id": request["session_id"],
            "request_id": request.get("request_id"),
            "agent_id": agent_id,
            "status": status,
            "timestamp": time.time(),
            **fields,
        }
        await client.publish(channel, json.dumps(message))

    await answer("processing")
    if question == "fail-agent":
        await answer("error", error=f"{agent_id} has no model loaded")
    elif question == "fail-request":
        failure = {"type": "agent_judgement_response", "status": "error", "error": "Celery is down"}
        await client.publish(channel, json.dumps(failure))
    elif question != "silent":
        for piece in contents(agent_id, question):
            await answer("streaming", content=piece)
        await answer("completed")


@pytest.fixture
async def run_backend(
    redis_url: str, bridge_settings: Settings
) -> AsyncIterator[Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]]]:
    tasks: list[asyncio.Task[None]] = []

    async def run() -> list[tuple[str, dict[str, Any]]]:
        seen: list[tuple[str, dict[str, Any]]] = []
        ready = asyncio.Event()
        prefix = bridge_settings.pubsub_channel_prefix
        tasks.append(asyncio.create_task(original_backend(redis_url, prefix, seen, ready)))
        await asyncio.wait_for(ready.wait(), 10)
        return seen

    yield run
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def thinking(messages: list[dict[str, Any]], agent_id: str) -> list[str]:
    return [
        m["data"]["thinking"]
        for m in messages
        if m["type"] == "agent_judgement_stream" and m["agent_id"] == agent_id
    ]


# -- the wire format -------------------------------------------------------------------------


def test_channel_names_are_the_original_ones_unless_prefixed() -> None:
    keys = Keys.pubsub()
    assert keys.request_channel(SID) == f"gateway:requests:{SID}"
    assert keys.responses_pattern == "gateway:responses:*"
    assert keys.session_of(f"gateway:responses:{SID}") == SID
    assert keys.session_of(f"gateway:requests:{SID}") is None
    assert Keys.pubsub("t:").request_channel(SID) == f"t:gateway:requests:{SID}"


def response(**fields: Any) -> bytes:
    return orjson.dumps({"type": "agent_response", "session_id": SID, "agent_id": "sage", **fields})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (response(status="processing"), OriginalResponse(SID, "sage", "processing")),
        (response(status="streaming", content="hm"), OriginalResponse(SID, "sage", "streaming", "hm")),
        (response(status="completed"), OriginalResponse(SID, "sage", "completed")),
        (response(status="error", error="boom"), OriginalResponse(SID, "sage", "error", error="boom")),
        (
            response(status="error"),
            OriginalResponse(SID, "sage", "error", error="The agent reported an error"),
        ),
        (
            orjson.dumps({"type": "agent_judgement_response", "status": "error", "error": "down"}),
            OriginalResponse(SID, None, "error", error="down", whole_request=True),
        ),
        (orjson.dumps({"type": "get_voters_response", "voters": []}), "other_type"),
        (orjson.dumps({"type": "agent_judgement_response", "status": "success"}), "other_type"),
        (b"not json", "not_json"),
        (b"[]", "not_an_object"),
        (response(status="thinking"), "bad_status"),
        (response(status="streaming", content=5), "bad_content"),
        (response(status="streaming", agent_id=5), "unknown_agent"),
        (response(status="streaming", session_id="../x"), "unknown_session"),
    ],
)
def test_parse_original_response(raw: bytes, expected: object) -> None:
    assert parse_original_response(raw, SID) == expected


def test_verdict_text_finds_a_split_tag_and_stays_bounded() -> None:
    text = VerdictText(100)
    for piece in ["I think <decision>NEG", "ATIVE</decision> no, ", "<dec", "ision>POSITIVE</decision>"]:
        text.add(piece)
    assert text.decision == "approve"
    assert text.text == "I think <decision>NEGATIVE</decision> no, <decision>POSITIVE</decision>"
    assert not text.truncated
    long = VerdictText(10)
    long.add("漢字漢字漢字")  # 18 bytes
    long.add("<decision>NEGATIVE</decision>")
    assert long.truncated
    assert long.text.startswith("漢字漢")
    assert len(long.text.split("\n")[0].encode()) <= 10
    assert long.decision == "reject"
    assert VerdictText(10).decision == "abstain"


# -- end to end ------------------------------------------------------------------------------


async def test_original_pubsub_backend_behind_the_gateway(
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    run_backend: Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]],
    bridge_settings: Settings,
) -> None:
    """A client's judgement reaches the backend on gateway:requests:SID with the client
    frame's fields; its agent_response messages come back as stream, final and verdict."""
    bridge = await start_bridge()
    seen = await run_backend()
    request = "<user_input>\nTea?\n</user_input>\n<response>\nYes\n</response>"
    async with await gateway.connect() as ws:
        record = await judge(
            ws,
            AGENTS,
            "Tea?",
            request_id="r-7",
            request=request,
            timestamp=1700000000,
            agents=[{"agent_id": a, "name": a.upper()} for a in AGENTS],
        )
    assert_well_formed(record, AGENTS)
    for agent_id in AGENTS:
        assert thinking(record.messages, agent_id) == contents(agent_id, "Tea?")
        final = record.finals[agent_id]
        assert final["result_code"] == 0
        assert final["data"] == {
            "judgement": "".join(contents(agent_id, "Tea?")),
            "decision": "approve" if VERDICTS[agent_id] == "POSITIVE" else "reject",
        }
    assert record.complete["data"]["verdict"] == "approve"
    session_id = record.complete["session_id"]
    prefix = bridge_settings.pubsub_channel_prefix
    assert sorted(m["agents"][0]["agent_id"] for _c, m in seen) == sorted(AGENTS)
    for channel, message in seen:
        assert channel == f"{prefix}gateway:requests:{session_id}"
        assert message["type"] == "agent_judgement"
        assert message["session_id"] == session_id
        assert message["request_id"] == "r-7"
        assert message["request"] == request
        assert message["timestamp"] == 1700000000
        agent_id = message["agents"][0]["agent_id"]
        assert message["agents"] == [{"agent_id": agent_id, "name": agent_id.upper()}]
        assert message["agent_ids"] == [agent_id]
    assert not bridge.dropped
    assert bridge.unrouted == 0
    assert bridge.routed == len(AGENTS) * (len(contents("sage", "Tea?")) + 2)


async def test_several_bridges_each_keep_their_own_responses(
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    run_backend: Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]],
) -> None:
    """Every bridge hears every response; each relays those of the requests it serves."""
    bridges = [await start_bridge(), await start_bridge()]
    await run_backend()
    async with await gateway.connect() as ws:
        for n in range(4):
            record = await judge(ws, AGENTS, f"question {n}")
            assert_well_formed(record, AGENTS)
            for agent_id in AGENTS:
                assert thinking(record.messages, agent_id) == contents(agent_id, f"question {n}")
            assert record.complete["data"]["verdict"] == "approve"
    per_request = len(contents("sage", "")) + 2
    assert sum(b.routed for b in bridges) == 4 * len(AGENTS) * per_request
    assert sum(b.unrouted for b in bridges) == 4 * len(AGENTS) * per_request


async def test_backend_errors_are_finals_with_result_code_1(
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    run_backend: Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]],
) -> None:
    await start_bridge()
    await run_backend()
    async with await gateway.connect() as ws:
        record = await judge(ws, AGENTS[:2], "fail-agent")
        assert_well_formed(record, AGENTS[:2])
        for agent_id in AGENTS[:2]:
            assert record.finals[agent_id]["result_code"] == 1
            assert record.finals[agent_id]["data"]["error"] == f"{agent_id} has no model loaded"
        assert record.complete["data"]["verdict"] == "abstain"

        record = await judge(ws, AGENTS[:2], "fail-request")
        assert_well_formed(record, AGENTS[:2])
        for agent_id in AGENTS[:2]:
            assert record.finals[agent_id]["result_code"] == 1
            assert record.finals[agent_id]["data"]["error"] == "Celery is down"


async def test_a_request_nobody_receives_is_result_code_3(
    gateway: GatewayHandle, start_bridge: StartBridge
) -> None:
    """No backend subscribes to gateway:requests:*: PUBLISH reaches no one."""
    bridge = await start_bridge()
    async with await gateway.connect() as ws:
        record = await judge(ws, AGENTS[:1])
    assert_well_formed(record, AGENTS[:1])
    final = record.finals[AGENTS[0]]
    assert final["result_code"] == 3
    assert "No backend received the request" in final["data"]["error"]
    assert bridge.routed == 0


async def test_an_unanswered_request_ends_at_its_deadline(
    settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_bridge: StartBridge,
    run_backend: Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]],
) -> None:
    """A backend that never completes (or whose answer was published while no bridge
    listened: pub/sub keeps nothing) leaves its agent to the session's timeout."""
    gateway = await start_gateway(settings.model_copy(update={"judgement_timeout_s": 1.0}))
    await start_bridge()
    await run_backend()
    async with await gateway.connect() as ws:
        record = await judge(ws, AGENTS[:1], "silent")
    assert_well_formed(record, AGENTS[:1])
    assert record.finals[AGENTS[0]]["result_code"] == 2


async def test_the_pubsub_bridge_command(
    redis_url: str,
    key_prefix: str,
    bridge_settings: Settings,
    gateway: GatewayHandle,
    run_backend: Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]],
) -> None:
    """``magi-gateway pubsub-bridge --agents A,B`` as its own process, stopped by SIGTERM."""
    await run_backend()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "PUBSUB_CHANNEL_PREFIX": bridge_settings.pubsub_channel_prefix,
    }
    process = spawn_process(["pubsub-bridge", "--agents", ",".join(AGENTS[:2])], env)
    try:
        assert gateway.gateway is not None
        liveness = gateway.gateway.store.liveness
        for _ in range(300):
            if all((await liveness.live_worker_counts(AGENTS[:2])).values()):
                break
            assert process.poll() is None, "the bridge exited"
            await asyncio.sleep(0.05)
        async with await gateway.connect() as ws:
            record = await judge(ws, AGENTS[:2], "Biscuits?")
        assert_well_formed(record, AGENTS[:2])
        assert record.finals["sage"]["data"]["decision"] == "approve"
        assert record.finals["seer"]["data"]["decision"] == "reject"
        assert thinking(record.messages, "seer") == contents("seer", "Biscuits?")
    finally:
        await asyncio.to_thread(stop_process, process)
    assert process.returncode == 0


def test_pubsub_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_AGENTS", " sage, seer ,,")
    monkeypatch.setenv("PUBSUB_CHANNEL_PREFIX", "site-a:")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.pubsub_agent_list == ["sage", "seer"]
    assert Keys.pubsub(settings.pubsub_channel_prefix).responses_pattern == "site-a:gateway:responses:*"
    assert PubSubBridge(settings=settings).agent_ids == frozenset(["sage", "seer"])
