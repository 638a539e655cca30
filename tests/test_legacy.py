"""The bridge for backends of the original system (``magi_gateway.worker.legacy``), on a real Redis.

The "original backend" here is written as the original one was: it pops requests from
``queue_agent_judgement`` with ``BLPOP`` and ``LPUSH``es JSON responses, with plain
redis commands. Each test gets its own list prefix, so the global list names of the
original system are never touched and tests cannot see each other's lists.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from magi_gateway._util import now_ms
from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.core.legacy import (
    LegacyResponse,
    decision_of,
    legacy_request,
    parse_legacy_response,
    resolve_agent,
)
from magi_gateway.core.session import ResultCode, new_session_id
from magi_gateway.redis.intake import PendingIntake
from magi_gateway.redis.keys import Keys, LegacyKeys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.legacy import LegacyBridge
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Context, Judgement, agent

from . import agents_for_tests
from ._support import GatewayHandle, assert_well_formed, judge, running_bridges

LEGACY = ["oldie", "elder"]
CHUNKS = 4
APP = "legacy-tests"
SID = SessionId("ab" * 16)

StartBridge = Callable[..., Awaitable[LegacyBridge]]


@pytest.fixture
def legacy_settings(settings: Settings, key_prefix: str) -> Settings:
    return settings.model_copy(
        update={"legacy_list_prefix": f"{key_prefix}:", "legacy_agents": ",".join(LEGACY)}
    )


@pytest.fixture
def lists(legacy_settings: Settings) -> LegacyKeys:
    return Keys.legacy(legacy_settings.legacy_list_prefix)


@pytest.fixture
def store(redis_client: aioredis.Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix))


@pytest.fixture
async def start_bridge(legacy_settings: Settings) -> AsyncIterator[StartBridge]:
    """Run bridges in this event loop; stopped at teardown, which checks they ended cleanly."""

    def make(settings: Settings | None = None, **kwargs: Any) -> LegacyBridge:
        return LegacyBridge(LEGACY, settings or legacy_settings, **kwargs)

    async with running_bridges(make) as start:
        yield start


async def original_backend(redis_url: str, lists: LegacyKeys, end: str = "left") -> None:
    """A backend of the original system: BLPOP a request, LPUSH chunks, then LPUSH a final."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pop = client.blpop if end == "left" else client.brpop
    push = client.lpush if end == "left" else client.rpush
    try:
        while True:
            result = await pop([lists.requests], timeout=1)
            if not result:
                continue
            _, message_data = result
            message = json.loads(message_data)
            for agent_id in message["agent_ids"]:
                for step in range(CHUNKS):
                    chunk = {
                        "type": "agent_judgement_stream",
                        "session_id": message["session_id"],
                        "agent_id": agent_id,
                        "data": {"thinking": f"{agent_id} step {step}"},
                    }
                    await push(lists.stream_responses, json.dumps(chunk))
                final = {
                    "type": "agent_judgement_final",
                    "session_id": message["session_id"],
                    "agent_id": agent_id,
                    "result_code": 0,
                    "data": {
                        "judgement": f"{agent_id}: {message['data']['user_input']}",
                        "decision": "approve",
                    },
                }
                await push(lists.final_responses, json.dumps(final))
    finally:
        await client.aclose()


async def gateway_client_backend(redis_url: str, lists: LegacyKeys, seen: list[dict[str, Any]]) -> None:
    """A backend on the list-era ``GatewayClient``: fields at the top level, not under ``data``.

    Chunks carry ``content``; the final its ``result``; the verdict is a ``<decision>`` tag
    in the text, as the original agents wrote it. Every request it pops goes to ``seen``.
    """
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        while True:
            result = await client.blpop([lists.requests], timeout=1)
            if not result:
                continue
            message = json.loads(result[1])
            seen.append(message)
            session_id, agent_id = message["session_id"], message["agent_ids"][0]
            for step in range(CHUNKS):
                chunk = {
                    "type": "agent_judgement_stream",
                    "session_id": session_id,
                    "agent_id": agent_id,
                    "content": f"{agent_id} step {step}",
                }
                await client.lpush(lists.stream_responses, json.dumps(chunk))
            verdict = "NEGATIVE" if agent_id == "elder" else "POSITIVE"
            final = {
                "type": "agent_judgement_final",
                "session_id": session_id,
                "agent_id": agent_id,
                "result": {"judgement": f"On {message['request']!r}: <decision>{verdict}</decision>"},
            }
            await client.lpush(lists.final_responses, json.dumps(final))
    finally:
        await client.aclose()


@pytest.fixture
async def run_backend(redis_url: str) -> AsyncIterator[Callable[..., None]]:
    tasks: list[asyncio.Task[None]] = []

    def run(lists: LegacyKeys, end: str = "left", seen: list[dict[str, Any]] | None = None) -> None:
        if seen is not None:
            tasks.append(asyncio.create_task(gateway_client_backend(redis_url, lists, seen)))
            return
        tasks.append(asyncio.create_task(original_backend(redis_url, lists, end)))

    yield run
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def new_session(store: Store, agents: list[str]) -> str:
    session_id = new_session_id()
    await store.create_session(session_id, APP, "no-gateway", agents, now_ms() + 30_000, None)
    return session_id


async def session_log(store: Store, session_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, 1)]


def chunk(session_id: str, agent_id: str, text: str) -> bytes:
    message = {"type": "agent_judgement_stream", "session_id": session_id, "agent_id": agent_id}
    return orjson.dumps({**message, "data": {"thinking": text}})


def final(session_id: str, agent_id: str | None = None, **fields: Any) -> bytes:
    message: dict[str, Any] = {"type": "agent_judgement_final", "session_id": session_id}
    if agent_id is not None:
        message["agent_id"] = agent_id
    message.update({"data": {"judgement": "ok", "decision": "approve"}, **fields})
    return orjson.dumps(message)


def chunks_of(log: list[dict[str, Any]], agent_id: str) -> list[dict[str, Any]]:
    return [m for m in log if m["type"] == "agent_judgement_stream" and m["agent_id"] == agent_id]


def thinking(log: list[dict[str, Any]], agent_id: str) -> list[str]:
    return [m["data"]["thinking"] for m in chunks_of(log, agent_id)]


def assert_complete_log(log: list[dict[str, Any]], agents: list[str]) -> None:
    """seq 1..n, one final per agent after all its chunks, one complete last."""
    assert [m["seq"] for m in log] == list(range(1, len(log) + 1))
    finals = [m for m in log if m["type"] == "agent_judgement_final"]
    assert sorted(m["agent_id"] for m in finals) == sorted(agents)
    for f in finals:
        assert all(m["seq"] < f["seq"] for m in chunks_of(log, f["agent_id"]))
    assert log[-1]["type"] == "agent_judgement_complete"


async def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    """The client may see a message before the bridge has counted it."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


async def run_burst(bridge: LegacyBridge) -> None:
    await asyncio.wait_for(bridge.run(), 30)


# -- the wire formats ------------------------------------------------------------------------


def test_list_names_are_the_original_ones_unless_prefixed() -> None:
    assert Keys.legacy() == LegacyKeys(
        requests="queue_agent_judgement",
        stream_responses="queue_agent_judgement_stream",
        final_responses="queue_agent_judgement_final",
        processing="queue_agent_judgement:bridge:processing",
        lease="queue_agent_judgement:bridge:lease",
    )
    assert Keys.legacy("t:").final_responses == "t:queue_agent_judgement_final"


def test_request_is_the_original_gateways_message() -> None:
    payload = json.loads(legacy_request(SID, AgentId("oldie"), "Tea?"))
    assert payload == {
        "type": "agent_judgement",
        "agent_ids": ["oldie"],
        "data": {"user_input": "Tea?"},
        "session_id": SID,
    }


def test_request_forwards_the_client_frames_other_fields() -> None:
    """As the original gateway did; ``agents`` (the original form's list) names this agent only."""
    fields = {
        "request_id": "r-1",
        "request": "<user_input>\nTea?\n</user_input>",
        "timestamp": 1700000000,
        "agents": [{"agent_id": "elder", "name": "E"}, {"agent_id": "oldie", "name": "O"}],
        "data": {"locale": "en"},
    }
    payload = json.loads(legacy_request(SID, AgentId("oldie"), "Tea?", fields))
    assert payload == {
        "type": "agent_judgement",
        "request_id": "r-1",
        "request": "<user_input>\nTea?\n</user_input>",
        "timestamp": 1700000000,
        "agents": [{"agent_id": "oldie", "name": "O"}],
        "agent_ids": ["oldie"],
        "data": {"locale": "en", "user_input": "Tea?"},
        "session_id": SID,
    }
    named = json.loads(legacy_request(SID, AgentId("oldie"), "Tea?", {"agents": [{"agent_id": "x"}]}))
    assert named["agents"] == [{"agent_id": "oldie"}]
    listed = json.loads(legacy_request(SID, AgentId("oldie"), "Tea?", agents_list=True))
    assert listed["agents"] == [{"agent_id": "oldie"}]
    assert "agents" not in json.loads(legacy_request(SID, AgentId("oldie"), "Tea?"))


@pytest.mark.parametrize(
    ("raw", "listed_as", "expected"),
    [
        (
            orjson.dumps(
                {"type": "agent_judgement_stream", "session_id": SID, "agent_id": "oldie", "content": "hm"}
            ),
            "stream",
            LegacyResponse("stream", SID, "oldie", {"thinking": "hm"}),
        ),
        (orjson.dumps({"session_id": SID, "content": 5}), "stream", "bad_data"),
        (orjson.dumps({"session_id": SID}), "stream", "bad_data"),
        (
            orjson.dumps({"session_id": SID, "result": {"judgement": "fine", "decision": "reject"}}),
            "final",
            LegacyResponse("final", SID, None, {"judgement": "fine", "decision": "reject"}),
        ),
        (
            orjson.dumps({"session_id": SID, "result": "yes <decision> POSITIVE </decision>"}),
            "final",
            LegacyResponse(
                "final",
                SID,
                None,
                {"judgement": "yes <decision> POSITIVE </decision>", "decision": "approve"},
            ),
        ),
        (
            orjson.dumps({"session_id": SID, "result": None, "error": "broke"}),
            "final",
            LegacyResponse("final", SID, None, {"error": "broke"}, ResultCode.AGENT_ERROR),
        ),
        (orjson.dumps({"session_id": SID, "result": [1]}), "final", "bad_data"),
    ],
)
def test_parse_the_gateway_client_top_level_form(raw: bytes, listed_as: Any, expected: object) -> None:
    assert parse_legacy_response(raw, listed_as) == expected


def test_decision_of_the_last_tag() -> None:
    assert decision_of("<decision>NEGATIVE</decision> then <decision>positive</decision>") == "approve"
    assert decision_of("<decision>NEGATIVE</decision>") == "reject"
    assert decision_of("no tag, <decision>MAYBE</decision>") is None


@pytest.mark.parametrize(
    ("raw", "listed_as", "expected"),
    [
        (b"not json", "stream", "not_json"),
        (b"[1, 2]", "stream", "not_an_object"),
        (b'{"type": "agent_judgement_stream", "data": {}}', "stream", "no_session_id"),
        (b'{"session_id": "abc"}', "stream", "unknown_session"),
        (orjson.dumps({"session_id": SID, "type": "agent_judgement_complete"}), "final", "bad_type"),
        (orjson.dumps({"session_id": SID, "type": 3}), "final", "bad_type"),
        (orjson.dumps({"session_id": SID, "agent_id": 7, "data": {}}), "stream", "unknown_agent"),
        (orjson.dumps({"session_id": SID, "data": 5}), "stream", "bad_data"),
        (orjson.dumps({"session_id": SID, "result_code": "0"}), "final", "bad_result_code"),
        (orjson.dumps({"session_id": SID, "result_code": 9}), "final", "bad_result_code"),
        (orjson.dumps({"session_id": SID, "result_code": True}), "final", "bad_result_code"),
        (
            orjson.dumps({"session_id": SID, "data": "hmm"}),
            "stream",
            LegacyResponse("stream", SID, None, {"thinking": "hmm"}),
        ),
        (
            orjson.dumps({"session_id": SID, "agent_id": "oldie", "type": "agent_judgement_final"}),
            "stream",
            LegacyResponse("final", SID, "oldie", {}),
        ),
        (
            orjson.dumps({"session_id": SID, "data": {"error": "broke"}}),
            "final",
            LegacyResponse("final", SID, None, {"error": "broke"}, ResultCode.AGENT_ERROR),
        ),
        (
            orjson.dumps({"session_id": SID, "result_code": 1}),
            "final",
            LegacyResponse(
                "final", SID, None, {"error": "The agent reported an error"}, ResultCode.AGENT_ERROR
            ),
        ),
    ],
)
def test_parse_legacy_response(raw: bytes, listed_as: Any, expected: object) -> None:
    assert parse_legacy_response(raw, listed_as) == expected


def ids(*names: str) -> list[AgentId]:
    return [AgentId(n) for n in names]


def test_resolve_agent() -> None:
    served = frozenset(AgentId(a) for a in LEGACY)
    assert resolve_agent("elder", ids("oldie", "elder"), served) == "elder"
    assert resolve_agent("stranger", ids("oldie"), served) is None
    assert resolve_agent(None, ids("oldie", "echo"), served) == "oldie"
    assert resolve_agent(None, ids("native"), served) == "native"
    assert resolve_agent(None, ids("oldie", "elder"), served) is None


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["left", "right"])
async def test_original_backend_behind_the_gateway(
    end: str,
    legacy_settings: Settings,
    lists: LegacyKeys,
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    start_worker: Callable[..., Awaitable[Worker]],
    run_backend: Callable[..., None],
) -> None:
    """A client asks legacy and native agents at once and gets every chunk, in order."""
    bridge = await start_bridge(legacy_settings.model_copy(update={"legacy_backend_end": end}))
    await start_worker([agents_for_tests.echo])
    run_backend(lists, end)
    agents = [*LEGACY, "echo"]
    async with await gateway.connect() as ws:
        for question in ("Tea?", "More tea?"):
            record = await judge(ws, agents, question)
            assert_well_formed(record, agents)
            assert_complete_log(record.messages, agents)
            for agent_id in LEGACY:
                assert thinking(record.messages, agent_id) == [f"{agent_id} step {i}" for i in range(CHUNKS)]
                final_message = record.finals[agent_id]
                assert final_message["result_code"] == 0
                assert final_message["data"] == {
                    "judgement": f"{agent_id}: {question}",
                    "decision": "approve",
                }
            assert record.complete["data"]["verdict"] == "approve"
    await eventually(lambda: bridge.relayed == 2 * len(LEGACY) * (CHUNKS + 1))
    assert not bridge.dropped
    assert bridge.refused == 0


async def test_gateway_client_backend_behind_the_gateway(
    lists: LegacyKeys,
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    run_backend: Callable[..., None],
) -> None:
    """The list-era ``GatewayClient`` form: top-level ``content`` chunks and ``result`` finals
    reach the client (they were dropped as ``bad_data``), and the backend gets the client
    frame's other fields."""
    bridge = await start_bridge()
    seen: list[dict[str, Any]] = []
    run_backend(lists, seen=seen)
    request = "<user_input>\nTea?\n</user_input>\n<response>\nYes\n</response>"
    async with await gateway.connect() as ws:
        record = await judge(ws, LEGACY, "Tea?", request_id="r-42", request=request, timestamp=1700000000)
    assert_well_formed(record, LEGACY)
    assert_complete_log(record.messages, LEGACY)
    for agent_id in LEGACY:
        assert thinking(record.messages, agent_id) == [f"{agent_id} step {i}" for i in range(CHUNKS)]
    assert record.finals["oldie"]["data"] == {
        "judgement": f"On {request!r}: <decision>POSITIVE</decision>",
        "decision": "approve",
    }
    assert record.finals["elder"]["data"]["decision"] == "reject"
    assert record.complete["data"]["verdict"] == "abstain"  # one each
    assert sorted(m["agent_ids"][0] for m in seen) == sorted(LEGACY)
    for message in seen:
        assert message["request_id"] == "r-42"
        assert message["request"] == request
        assert message["timestamp"] == 1700000000
        assert message["data"] == {"user_input": "Tea?"}
    await eventually(lambda: bridge.relayed == len(LEGACY) * (CHUNKS + 1))
    assert not bridge.dropped


async def test_the_client_frames_fields_reach_any_worker(
    gateway: GatewayHandle, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    """Through the intake mark and the request stream: ``ctx.request_fields``, as sent."""
    received: list[dict[str, Any]] = []

    @agent("fields")
    async def fields(user_input: str, ctx: Context) -> Judgement:
        received.append(ctx.request_fields)
        return Judgement(user_input, decision="approve")

    await start_worker([fields])
    async with await gateway.connect() as ws:
        await judge(ws, ["fields"], "Tea?")
        extra = {"request": "<user_input>Tea?</user_input>", "timestamp": 1.5, "agents": [{"agent_id": "x"}]}
        await judge(ws, ["fields"], "Tea?", request_id="r-9", **extra)
        await judge(ws, ["fields"], "Tea?", data={"user_input": "Tea?", "locale": "en"})
    assert received == [{}, {"request_id": "r-9", **extra}, {"data": {"locale": "en"}}]


async def test_requests_reach_the_backend_oldest_first(
    legacy_settings: Settings, lists: LegacyKeys, store: Store, redis_client: aioredis.Redis
) -> None:
    """The original LPUSH + BLPOP served a backlog newest first; the bridge pushes for FIFO."""
    sessions = []
    for n in range(8):
        session_id = await new_session(store, ["oldie"])
        await store.enqueue_request(session_id, "oldie", f"question {n}", now_ms() + 30_000, APP)
        sessions.append(session_id)
    await run_burst(LegacyBridge(LEGACY, legacy_settings, burst=True))
    popped = []
    while item := await redis_client.lpop(lists.requests):  # what BLPOP would take
        popped.append(json.loads(item))
    assert [m["session_id"] for m in popped] == sessions
    assert [m["data"]["user_input"] for m in popped] == [f"question {n}" for n in range(8)]
    assert await redis_client.ttl(lists.requests) == -2  # emptied; while it exists it expires


async def test_response_backlog_is_delivered_in_order(
    legacy_settings: Settings, lists: LegacyKeys, store: Store, redis_client: aioredis.Redis
) -> None:
    """Responses LPUSHed before the bridge starts: chunks in order, no final before its chunks."""
    sessions = [await new_session(store, ["oldie"]) for _ in range(3)]
    both = await new_session(store, LEGACY)
    steps = 40
    for step in range(steps):
        for session_id in sessions if step <= 20 else sessions[1:]:
            await redis_client.lpush(lists.stream_responses, chunk(session_id, "oldie", f"step {step}"))
        await redis_client.lpush(lists.stream_responses, chunk(both, LEGACY[step % 2], f"step {step}"))
        if step == 20:
            # The first session is done: its final is queued while all its chunks still wait.
            await redis_client.lpush(lists.final_responses, final(sessions[0], "oldie"))
    for session_id in sessions[1:]:
        await redis_client.lpush(lists.final_responses, final(session_id, "oldie"))
    for agent_id in LEGACY:
        await redis_client.lpush(lists.final_responses, final(both, agent_id))

    bridge = LegacyBridge(LEGACY, legacy_settings, burst=True, batch_size=16)
    await run_burst(bridge)

    early = await session_log(store, sessions[0])
    assert_complete_log(early, ["oldie"])
    assert thinking(early, "oldie") == [f"step {s}" for s in range(21)]
    for session_id in sessions[1:]:
        log = await session_log(store, session_id)
        assert_complete_log(log, ["oldie"])
        assert thinking(log, "oldie") == [f"step {s}" for s in range(steps)]
    log = await session_log(store, both)
    assert_complete_log(log, LEGACY)
    assert thinking(log, "oldie") == [f"step {s}" for s in range(0, steps, 2)]
    assert thinking(log, "elder") == [f"step {s}" for s in range(1, steps, 2)]
    assert bridge.refused == 0
    assert not bridge.dropped
    assert not await redis_client.exists(lists.processing, lists.stream_responses, lists.final_responses)


async def test_legacy_responses_keep_the_output_limits(
    legacy_settings: Settings, lists: LegacyKeys, store: Store, redis_client: aioredis.Redis
) -> None:
    """A backend's 3 MB chunk is split (nothing lost, its other fields on the first piece);
    its oversized final becomes result_code 1."""
    session_id = await new_session(store, LEGACY)
    text = "漢字 and ascii, " * (3 * 1024 * 1024 // 19)
    message = orjson.loads(chunk(session_id, "oldie", text))
    message["data"]["tone"] = "calm"
    await redis_client.lpush(lists.stream_responses, orjson.dumps(message))
    await redis_client.lpush(lists.final_responses, final(session_id, "oldie"))
    big = {"judgement": "x" * legacy_settings.max_final_bytes, "decision": "approve"}
    await redis_client.lpush(lists.final_responses, final(session_id, "elder", data=big))

    await run_burst(LegacyBridge(LEGACY, legacy_settings, burst=True))

    log = await session_log(store, session_id)
    assert_complete_log(log, LEGACY)
    pieces = chunks_of(log, "oldie")
    assert len(pieces) >= len(text.encode()) // legacy_settings.max_chunk_bytes > 1
    assert "".join(m["data"]["thinking"] for m in pieces) == text
    assert all(
        len(orjson.dumps(m["data"]["thinking"])) - 2 <= legacy_settings.max_chunk_bytes for m in pieces
    )
    assert pieces[0]["data"]["tone"] == "calm"
    assert all(set(m["data"]) == {"thinking"} for m in pieces[1:])
    finals = {m["agent_id"]: m for m in log if m["type"] == "agent_judgement_final"}
    assert finals["oldie"]["result_code"] == 0
    assert finals["elder"]["result_code"] == 1
    assert "over the limit" in finals["elder"]["data"]["error"]


async def test_responses_taken_by_a_dead_bridge_are_delivered_once(
    legacy_settings: Settings, lists: LegacyKeys, store: Store, redis_client: aioredis.Redis
) -> None:
    """A bridge died after moving responses into the processing list, holding the lease."""
    first = await new_session(store, ["oldie"])
    second = await new_session(store, ["elder"])
    # As the dead bridge left them: oldest at the right end, finals behind their 0xFF tag.
    await redis_client.lpush(lists.processing, chunk(first, "oldie", "one"))
    await redis_client.lpush(lists.processing, chunk(first, "oldie", "two"))
    await redis_client.lpush(lists.processing, b"\xff" + final(second, "elder"))
    await redis_client.lpush(lists.final_responses, final(first, "oldie"))
    await redis_client.set(lists.lease, "dead-bridge", px=1500)

    fast = legacy_settings.model_copy(update={"worker_heartbeat_interval_s": 0.1})
    bridge = LegacyBridge(LEGACY, fast, burst=True)
    started = asyncio.get_running_loop().time()
    await run_burst(bridge)
    assert asyncio.get_running_loop().time() - started >= 1.0  # waited for the lease to expire

    log = await session_log(store, first)
    assert_complete_log(log, ["oldie"])
    assert thinking(log, "oldie") == ["one", "two"]
    assert_complete_log(await session_log(store, second), ["elder"])
    assert bridge.relayed == 4
    assert not await redis_client.exists(lists.processing, lists.final_responses, lists.lease)


async def test_only_one_bridge_relays_responses(
    lists: LegacyKeys,
    redis_client: aioredis.Redis,
    gateway: GatewayHandle,
    start_bridge: StartBridge,
    run_backend: Callable[..., None],
) -> None:
    bridges = [await start_bridge(), await start_bridge()]
    run_backend(lists)
    async with await gateway.connect() as ws:
        for _ in range(3):
            record = await judge(ws, LEGACY)
            assert_complete_log(record.messages, LEGACY)
    holder = (await redis_client.get(lists.lease)).decode()
    leader = next(bridge for bridge in bridges if bridge.worker.worker_id == holder)
    await eventually(lambda: leader.relayed == 3 * len(LEGACY) * (CHUNKS + 1))
    assert sum(bridge.relayed for bridge in bridges) == leader.relayed


async def test_malformed_and_late_responses_are_dropped(
    legacy_settings: Settings,
    lists: LegacyKeys,
    store: Store,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_id = await new_session(store, ["oldie"])
    junk = [
        b"not json",
        b"[1, 2]",
        b'{"type": "agent_judgement_stream", "data": {"thinking": "whose?"}}',
        chunk("0" * 32, "oldie", "nobody's session"),
        chunk(session_id, "stranger", "not asked"),
        orjson.dumps({"session_id": session_id, "type": "bogus"}),
    ]
    for raw in [*junk, chunk(session_id, "oldie", "fine")]:
        await redis_client.lpush(lists.stream_responses, raw)
    await redis_client.lpush(lists.final_responses, final(session_id, "oldie", result_code="zero"))
    # No agent_id and no type: the session's only legacy agent, and the list's kind.
    await redis_client.lpush(lists.final_responses, orjson.dumps({"session_id": session_id, "data": {}}))

    bridge = LegacyBridge(LEGACY, legacy_settings, burst=True)
    await run_burst(bridge)
    log = await session_log(store, session_id)
    assert_complete_log(log, ["oldie"])
    assert thinking(log, "oldie") == ["fine"]
    assert log[-2]["result_code"] == 0
    assert bridge.dropped == Counter(
        not_json=1,
        not_an_object=1,
        no_session_id=1,
        unknown_session=1,
        unknown_agent=1,
        bad_type=1,
        bad_result_code=1,
    )
    assert sum(1 for r in caplog.records if "dropped a legacy response" in r.getMessage()) == 7

    # A chunk after the agent's final is refused by the session, not shown.
    await redis_client.lpush(lists.stream_responses, chunk(session_id, "oldie", "too late"))
    again = LegacyBridge(LEGACY, legacy_settings, burst=True)
    await run_burst(again)
    assert again.refused == 1
    assert await session_log(store, session_id) == log


def test_legacy_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEGACY_AGENTS", " oldie, elder ,,")
    monkeypatch.setenv("LEGACY_LIST_PREFIX", "site-a:")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.legacy_agent_list == LEGACY
    assert settings.legacy_backend_end == "left"
    assert Keys.legacy(settings.legacy_list_prefix).requests == "site-a:queue_agent_judgement"
    assert LegacyBridge(settings=settings).agent_ids == frozenset(LEGACY)


def test_intake_mark_keeps_the_client_fields() -> None:
    """The repair sweep queues a session's requests from its mark: the fields come along."""
    intake = PendingIntake(SID, AppId(APP), (AgentId("oldie"),), "Tea?", 1, b'{"request_id":"r-1"}')
    assert PendingIntake.decode(SID, intake.encode()) == intake
    bare = PendingIntake(SID, AppId(APP), (AgentId("oldie"),), "Tea?", 1)
    assert PendingIntake.decode(SID, bare.encode()) == bare
