"""The Redis side of sessions, requests and liveness (``magi_gateway.redis.store``), on a real Redis.

Also: two gateway instances sharing one Redis deliver each client exactly its own sessions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from magi_gateway._util import Backoff, now_ms
from magi_gateway.agents import demo_agents
from magi_gateway.core import frames
from magi_gateway.core.errors import RateLimited, TooManySessions
from magi_gateway.core.notification import decode_notification
from magi_gateway.core.session import ResultCode, new_session_id
from magi_gateway.redis.intake import AppLimits, PendingIntake
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.requests import Request
from magi_gateway.redis.store import Store
from magi_gateway.server.sweeper import sweep_deadlines
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import (
    GatewayHandle,
    SessionRecord,
    assert_well_formed,
    collect_sessions,
    judgement_message,
    recv,
    send,
)

OWNER = "instance-under-test"
#: The connection that opens the test's sessions (on OWNER), their first viewer.
OPENER = "connection-under-test"
APP = "app-1"
AGENTS = ["melchior", "balthasar", "casper"]
RETENTION_S = 5
TIMEOUT_MS = 60_000


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def store(redis_client: Redis, keys: Keys) -> Store:
    return Store(redis_client, keys, retention_s=RETENTION_S)


async def new_session(
    store: Store,
    agents: list[str] | None = None,
    *,
    owner: str = OWNER,
    request_id: str | None = None,
) -> str:
    session_id = new_session_id()
    await store.create_session(
        session_id,
        APP,
        owner,
        agents or AGENTS,
        now_ms() + TIMEOUT_MS,
        request_id,
        viewer=OPENER,
    )
    return session_id


async def log_of(store: Store, session_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, 1)]


# -- the session log -------------------------------------------------------------------------


async def test_create_session_writes_accepted_at_seq_1(store: Store, keys: Keys, redis_client: Redis) -> None:
    session_id = await new_session(store, request_id="rid-7")
    entries = await redis_client.xrange(keys.session(session_id).log)
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert entry_id == b"0-1"
    frame = orjson.loads(fields[b"f"])
    assert frame == {
        "type": "agent_judgement_accepted",
        "session_id": session_id,
        "seq": 1,
        "agent_ids": AGENTS,
        "request_id": "rid-7",
    }
    assert await redis_client.get(keys.session(session_id).seq) == b"1"
    info = await store.session_info(session_id)
    assert info is not None
    assert info.appid == APP
    assert info.owner == OWNER
    assert await store.viewers.entries(session_id) == [(OWNER, OPENER)]  # the opener follows it
    assert info.agent_ids == tuple(AGENTS)
    assert info.pending == frozenset(AGENTS)
    assert not info.completed


async def test_a_session_is_created_with_its_accepted_in_one_command(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    # A gateway killed between two commands must not leave a session without its seq 1
    # (one the client's retry is answered by but never recognises): the one command that
    # creates the session's keys also writes agent_judgement_accepted.
    await new_session(store)  # the script loaded: no NOSCRIPT and retry in what is watched
    session_id = new_session_id()
    session = keys.session(session_id)
    marker = uuid.uuid4().hex
    async with redis_client.monitor() as monitor:
        await store.create_session(session_id, APP, OWNER, AGENTS, now_ms() + TIMEOUT_MS, "rid-8")
        await redis_client.echo(marker)
        seen: list[str] = []
        while marker not in (seen[-1] if seen else ""):
            command = await asyncio.wait_for(monitor.next_command(), 10)
            if command.get("client_type") != "lua":  # what the scripts do inside
                seen.append(str(command["command"]))
    creating = [command for command in seen if session.meta in command]
    assert len(creating) == 1, creating
    assert session.log in creating[0]
    assert "agent_judgement_accepted" in creating[0]
    assert [e[0] for e in await redis_client.xrange(session.log)] == [b"0-1"]
    info = await store.session_info(session_id)
    assert info is not None
    assert info.pending == frozenset(AGENTS)


async def test_a_new_sessions_requests_are_queued_in_its_creating_round_trip(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    # On one server the creation and the enqueue are pipelined: the creation first, on the
    # same connection, so no worker can read a request before its session exists.
    await new_session(store)
    await store.intake.enqueue(PendingIntake(new_session_id(), APP, (), "", 0), marked=False)  # loaded
    session_id = new_session_id()
    intake = PendingIntake(session_id, APP, tuple(AGENTS), "question", now_ms() + TIMEOUT_MS)
    marker = uuid.uuid4().hex
    async with redis_client.monitor() as monitor:
        queued = await store.create_session(
            session_id, APP, OWNER, AGENTS, intake.deadline_ms, None, intake=intake, enqueue=True
        )
        await redis_client.echo(marker)
        seen: list[str] = []
        while marker not in (seen[-1] if seen else ""):
            command = await asyncio.wait_for(monitor.next_command(), 10)
            if command.get("client_type") != "lua":
                seen.append(str(command["command"]))
    assert queued is True
    creating = [i for i, c in enumerate(seen) if keys.session(session_id).meta in c]
    enqueueing = [i for i, c in enumerate(seen) if keys.requests(AGENTS[0], APP) in c]
    assert len(creating) == 1, seen
    assert len(enqueueing) == 1, seen
    assert creating[0] < enqueueing[0]
    for agent in AGENTS:
        entries = await redis_client.xrange(keys.requests(agent, APP))
        assert [fields[b"sid"] for _, fields in entries] == [session_id.encode()]
    assert not await redis_client.hexists(keys.unqueued, session_id)  # the mark went with the enqueue


@pytest.mark.parametrize("limits", [AppLimits(max_running=1), AppLimits(max_per_s=1)])
async def test_a_refused_admission_in_the_pipelined_opening_writes_nothing(
    redis_client: Redis, keys: Keys, limits: AppLimits
) -> None:
    # The creation and the enqueue ride in the admission's round trip: refused, neither
    # may write (the creation is guarded by the deadline entry, the enqueue by the mark).
    store = Store(redis_client, keys, retention_s=RETENTION_S, app_limits=limits)
    opened = []
    for _ in range(2):
        session_id = new_session_id()
        intake = PendingIntake(session_id, APP, tuple(AGENTS), "question", now_ms() + TIMEOUT_MS)
        try:
            assert await store.create_session(
                session_id, APP, OWNER, AGENTS, intake.deadline_ms, None, intake=intake, enqueue=True
            )
        except (TooManySessions, RateLimited):
            refused = session_id
        else:
            opened.append(session_id)
    assert len(opened) == 1
    assert not await redis_client.exists(*keys.session(refused).all())
    assert await redis_client.zscore(keys.deadlines, refused) is None
    assert not await redis_client.hexists(keys.unqueued, refused)
    for agent in AGENTS:
        entries = await redis_client.xrange(keys.requests(agent, APP))
        assert [fields[b"sid"] for _, fields in entries] == [opened[0].encode()]


async def test_after_a_script_flush_a_session_is_created_and_its_requests_queued_once(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    # A restarted server has no scripts: the pipelined EVALSHAs fail with NOSCRIPT, the
    # creation is run again through the Script (which loads it), and the enqueue is left
    # to intake.enqueue, once.
    await new_session(store)  # the scripts are loaded...
    await redis_client.script_flush()  # ...and gone
    session_id = new_session_id()
    intake = PendingIntake(session_id, APP, tuple(AGENTS), "question", now_ms() + TIMEOUT_MS)
    queued = await store.create_session(
        session_id, APP, OWNER, AGENTS, intake.deadline_ms, None, intake=intake, enqueue=True
    )
    assert queued is False
    assert [e[0] for e in await redis_client.xrange(keys.session(session_id).log)] == [b"0-1"]
    assert await store.intake.enqueue(intake) is True
    assert await store.intake.enqueue(intake) is False  # the mark is gone: once
    for agent in AGENTS:
        entries = await redis_client.xrange(keys.requests(agent, APP))
        assert [fields[b"sid"] for _, fields in entries] == [session_id.encode()]


async def test_appends_allocate_consecutive_seqs_and_frames_start_with_type_session_seq(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    session_id = await new_session(store)
    seqs = [
        (await store.append_stream(session_id, "melchior", {"thinking": "a"})).seq,
        (await store.append_stream(session_id, "casper", {"thinking": "b"})).seq,
        (await store.append_final(session_id, "melchior", ResultCode.OK, {"judgement": "j"})).seq,
        (await store.append_stream(session_id, "balthasar", {"thinking": 'ü ☃ "quoted"'})).seq,
    ]
    assert seqs == [2, 3, 4, 5]
    entries = await redis_client.xrange(keys.session(session_id).log)
    assert [e[0] for e in entries] == [b"0-1", b"0-2", b"0-3", b"0-4", b"0-5"]
    for seq, (_entry_id, fields) in enumerate(entries, start=1):
        raw: bytes = fields[b"f"]
        frame = orjson.loads(raw)  # valid JSON
        assert list(frame)[:3] == ["type", "session_id", "seq"]
        assert frame["session_id"] == session_id
        assert frame["seq"] == seq
        assert raw.startswith(b'{"type":"')
    frames = await log_of(store, session_id)
    assert frames[1] == {
        "type": "agent_judgement_stream",
        "session_id": session_id,
        "seq": 2,
        "agent_id": "melchior",
        "data": {"thinking": "a"},
    }
    assert frames[3]["type"] == "agent_judgement_final"
    assert frames[3]["result_code"] == 0
    assert frames[3]["data"] == {"judgement": "j"}
    assert frames[4]["data"]["thinking"] == 'ü ☃ "quoted"'


async def test_second_final_for_an_agent_is_refused(store: Store) -> None:
    session_id = await new_session(store)
    first = await store.append_final(session_id, "casper", ResultCode.OK, {"judgement": "yes"})
    again = await store.append_final(session_id, "casper", ResultCode.TIMEOUT, {"error": "late"})
    assert first.seq == 2
    assert again.seq is None
    finals = [f for f in await log_of(store, session_id) if f["type"] == "agent_judgement_final"]
    assert len(finals) == 1
    assert finals[0]["result_code"] == 0


async def test_final_for_an_agent_not_in_the_session_is_refused(store: Store) -> None:
    session_id = await new_session(store)
    result = await store.append_final(session_id, "stranger", ResultCode.OK, {"judgement": "x"})
    assert result.seq is None
    assert len(await log_of(store, session_id)) == 1


async def test_stream_chunks_after_an_agents_final_are_dropped(store: Store) -> None:
    session_id = await new_session(store)
    await store.append_final(session_id, "melchior", ResultCode.OK, {"judgement": "done"})
    late = await store.append_stream(session_id, "melchior", {"thinking": "late"})
    other = await store.append_stream(session_id, "casper", {"thinking": "still on"})
    assert late.seq is None
    assert other.seq == 3
    frames = await log_of(store, session_id)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert all(f.get("data", {}).get("thinking") != "late" for f in frames)


async def test_last_final_writes_exactly_one_complete_with_majority_verdict(store: Store) -> None:
    session_id = await new_session(store)
    # Finals arrive in another order than requested; results keep the request order.
    r1 = await store.append_final(
        session_id,
        "casper",
        ResultCode.OK,
        {"judgement": "no", "decision": "REJECT"},
    )
    r2 = await store.append_final(
        session_id,
        "melchior",
        ResultCode.OK,
        {"judgement": "yes", "decision": "approve"},
    )
    r3 = await store.append_final(
        session_id,
        "balthasar",
        ResultCode.OK,
        {"judgement": "no", "decision": "reject"},
    )
    assert (r1.completed, r2.completed, r3.completed) == (False, False, True)
    assert (r1.seq, r2.seq, r3.seq) == (2, 3, 4)
    frames = await log_of(store, session_id)
    completes = [f for f in frames if f["type"] == "agent_judgement_complete"]
    assert len(completes) == 1
    complete = completes[0]
    assert complete is frames[-1]
    assert complete["seq"] == 5
    assert complete["data"]["verdict"] == "reject"
    assert list(complete["data"]["results"]) == AGENTS
    assert complete["data"]["results"] == {
        "melchior": {"result_code": 0, "decision": "approve"},
        "balthasar": {"result_code": 0, "decision": "reject"},
        "casper": {"result_code": 0, "decision": "reject"},
    }
    # Nothing more can be appended to a completed session.
    assert (await store.append_stream(session_id, "casper", {"thinking": "x"})).seq is None
    assert (await store.append_final(session_id, "casper", ResultCode.OK, {})).seq is None
    info = await store.session_info(session_id)
    assert info is not None
    assert info.completed
    assert info.pending == frozenset()


async def test_failed_agents_do_not_vote_and_a_tie_is_abstain(store: Store) -> None:
    session_id = await new_session(store, ["a", "b", "c", "d"])
    await store.append_final(session_id, "a", ResultCode.OK, {"judgement": "", "decision": "approve"})
    await store.append_final(session_id, "b", ResultCode.OK, {"judgement": "", "decision": "reject"})
    await store.append_final(session_id, "c", ResultCode.AGENT_ERROR, {"error": "boom"})
    await store.append_final(session_id, "d", ResultCode.TIMEOUT, {"error": "slow", "decision": "banana"})
    complete = (await log_of(store, session_id))[-1]
    assert complete["type"] == "agent_judgement_complete"
    assert complete["data"] == {
        "verdict": "abstain",
        "results": {
            "a": {"result_code": 0, "decision": "approve"},
            "b": {"result_code": 0, "decision": "reject"},
            "c": {"result_code": 1},
            "d": {"result_code": 2},
        },
    }


async def test_every_session_key_expires_and_completion_shortens_it_to_the_retention(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    session_id = await new_session(store, ["melchior", "casper"])
    await store.append_stream(session_id, "melchior", {"thinking": "hm"})
    await store.append_final(session_id, "melchior", ResultCode.OK, {"decision": "approve"})
    session_keys = keys.session(session_id)
    created = {k.decode() async for k in redis_client.scan_iter(match=f"{keys.prefix}:s:*")}
    assert created == set(session_keys.all())
    for key in created:
        ttl = await redis_client.pttl(key)
        # Running session: expiry covers the time to the deadline plus the retention.
        assert RETENTION_S * 1000 < ttl <= TIMEOUT_MS + RETENTION_S * 1000, key
    await store.append_final(session_id, "casper", ResultCode.OK, {"decision": "approve"})
    # The pending set is empty now, so Redis removed it; everything else is kept for the retention.
    assert not await redis_client.exists(session_keys.pending)
    remaining = {k.decode() async for k in redis_client.scan_iter(match=f"{keys.prefix}:s:*")}
    assert remaining == {
        session_keys.log,
        session_keys.seq,
        session_keys.meta,
        session_keys.results,
        session_keys.viewers,
    }
    for key in remaining:
        ttl = await redis_client.pttl(key)
        assert 0 < ttl <= RETENTION_S * 1000, key


async def test_unknown_session_appends_are_refused(store: Store, keys: Keys, redis_client: Redis) -> None:
    session_id = new_session_id()
    assert (await store.append_stream(session_id, "melchior", {"thinking": "x"})).seq is None
    assert (await store.append_final(session_id, "melchior", ResultCode.OK, {})).seq is None
    assert await store.session_info(session_id) is None
    assert await store.read_log(session_id, 1) == []
    assert [k async for k in redis_client.scan_iter(match=f"{keys.prefix}:*")] == []


async def test_claim_request_id_returns_the_first_session(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    first, second = new_session_id(), new_session_id()
    assert await store.request_ids.claim(APP, "rid-1", first, 30_000) is None
    assert await store.request_ids.claim(APP, "rid-1", second, 30_000) == first
    assert await store.request_ids.claim(APP, "rid-1", second, 30_000) == first
    # Scoped per appid and per request id.
    assert await store.request_ids.claim("app-2", "rid-1", second, 30_000) is None
    assert await store.request_ids.claim(APP, "rid-2", second, 30_000) is None
    ttl = await redis_client.pttl(keys.idempotency(APP, "rid-1"))
    assert 0 < ttl <= 30_000


async def test_session_message_cap_drops_chunks_but_keeps_finals(redis_client: Redis, keys: Keys) -> None:
    store = Store(redis_client, keys, retention_s=RETENTION_S, max_session_messages=5)
    session_id = await new_session(store, ["melchior", "casper"])
    results = [
        (await store.append_stream(session_id, "melchior", {"thinking": str(i)})).seq for i in range(8)
    ]
    assert results == [2, 3, 4, 5, None, None, None, None]
    final_m = await store.append_final(session_id, "melchior", ResultCode.OK, {"decision": "approve"})
    assert final_m.seq == 6
    assert (await store.append_stream(session_id, "casper", {"thinking": "x"})).seq is None
    final_c = await store.append_final(session_id, "casper", ResultCode.OK, {"decision": "approve"})
    assert final_c.seq == 7
    assert final_c.completed
    frames = await log_of(store, session_id)
    assert [f["seq"] for f in frames] == list(range(1, 9))
    assert frames[-1]["type"] == "agent_judgement_complete"
    assert frames[-1]["data"]["verdict"] == "approve"


async def test_read_log_ranges(store: Store) -> None:
    session_id = await new_session(store)
    for i in range(5):
        await store.append_stream(session_id, "melchior", {"thinking": str(i)})
    sid: Any = session_id
    assert [s for s, _, _ in await store.read_log(sid, 1)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _, _ in await store.read_log(sid, 2, 3)] == [2, 3]
    assert [s for s, _, _ in await store.read_log(sid, 4)] == [4, 5, 6]
    assert [s for s, _, _ in await store.read_log(sid, 6, 6)] == [6]
    assert [s for s, _, _ in await store.read_log(sid, 7)] == []
    assert [s for s, _, _ in await store.read_log(sid, 3, 100)] == [3, 4, 5, 6]
    # Seq 10 sorts after seq 9 (stream ids, not strings).
    for i in range(5):
        await store.append_stream(session_id, "melchior", {"thinking": str(i)})
    assert [s for s, _, _ in await store.read_log(sid, 9, 11)] == [9, 10, 11]
    stored = await store.read_log(sid, 2, 2)
    assert stored[0][1] == b"agent_judgement_stream"
    assert orjson.loads(stored[0][2])["data"] == {"thinking": "0"}


# -- liveness ----------------------------------------------------------------------------------


async def test_heartbeat_live_counts_live_agents_and_retire(store: Store) -> None:
    await store.liveness.heartbeat("w1", ["x", "y"], 30_000)
    await store.liveness.heartbeat("w2", ["x"], 30_000)
    await store.liveness.heartbeat("w2", ["x"], 30_000)  # repeated beats count once
    assert await store.liveness.live_worker_counts(["x", "y", "z"]) == {"x": 2, "y": 1, "z": 0}
    assert await store.liveness.live_agents() == {"x": 2, "y": 1}
    await store.liveness.retire_worker("w1", ["x", "y"])
    assert await store.liveness.live_worker_counts(["x", "y"]) == {"x": 1, "y": 0}
    assert await store.liveness.live_agents() == {"x": 1}
    await store.liveness.retire_worker("w2", ["x"])
    assert await store.liveness.live_agents() == {}


async def test_liveness_expires_after_the_ttl(store: Store, keys: Keys, redis_client: Redis) -> None:
    await store.liveness.heartbeat("short", ["brief"], 200)
    await store.liveness.heartbeat("long", ["lasting"], 30_000)
    assert await store.liveness.live_agents() == {"brief": 1, "lasting": 1}
    await asyncio.sleep(0.3)
    assert await store.liveness.live_worker_counts(["brief", "lasting"]) == {"brief": 0, "lasting": 1}
    assert await store.liveness.live_agents() == {"lasting": 1}
    # The registries themselves expire too.
    assert await redis_client.pttl(keys.workers("lasting")) > 0
    assert await redis_client.pttl(keys.agents) > 0


async def test_a_short_ttl_worker_does_not_expire_other_workers(store: Store) -> None:
    await store.liveness.heartbeat("long-lived", ["shared", "only-long"], 30_000)
    await store.liveness.heartbeat("short-lived", ["shared"], 100)
    await asyncio.sleep(0.5)  # the short-lived worker is gone (ttl 100 ms, registries x3)
    assert await store.liveness.live_worker_counts(["shared", "only-long"]) == {"shared": 1, "only-long": 1}
    assert await store.liveness.live_agents() == {"only-long": 1, "shared": 1}


# -- notifications and requests ---------------------------------------------------------------


@pytest.fixture
async def owner_channel(redis_client: Redis, keys: Keys) -> AsyncIterator[PubSub]:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.gateway_channel(OWNER))
    try:
        yield pubsub
    finally:
        await pubsub.aclose()


async def next_notification(pubsub: PubSub, timeout: float = 5) -> bytes:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        message = await pubsub.get_message(timeout=0.5)
        if message is not None:
            data: bytes = message["data"]
            return data
    raise AssertionError("no notification")


async def test_every_logged_message_is_published_to_the_owner(store: Store, owner_channel: PubSub) -> None:
    session_id = await new_session(store, ["melchior"])
    await store.append_stream(session_id, "melchior", {"thinking": "line one\nline two"})
    await store.append_final(session_id, "melchior", ResultCode.OK, {"decision": "approve"})
    logged = await store.read_log(session_id, 1)
    assert [s for s, _, _ in logged] == [1, 2, 3, 4]
    for seq, kind, frame in logged:
        payload = await next_notification(owner_channel)
        assert payload == f"{session_id}\n{seq}\n".encode() + kind + b"\n" + frame
        assert kind == orjson.loads(frame)["type"].encode()
        # The frame holds no raw newline (compact JSON), so newlines separate the fields.
        _sid, _seq, _kind, rest = payload.split(b"\n")
        assert orjson.loads(rest)["seq"] == seq


async def test_notifications_reach_every_instance_with_viewers_once(
    store: Store, owner_channel: PubSub, redis_client: Redis, keys: Keys
) -> None:
    session_id = await new_session(store, ["melchior"], owner="someone-else")
    other = redis_client.pubsub(ignore_subscribe_messages=True)
    await other.subscribe(keys.gateway_channel("someone-else"))
    try:
        await store.append_stream(session_id, "melchior", {"thinking": "a"})
        assert (await next_notification(other)).startswith(f"{session_id}\n2\n".encode())
        # Two more viewers on OWNER: it is notified too, once per message; nobody is moved.
        for connection in ("c1", "c2"):
            await store.viewers.join(session_id, OWNER, connection, max_viewers=16, lease_ms=30_000)
        await store.append_stream(session_id, "melchior", {"thinking": "b"})
        chunk = frames.stream_tail("melchior", {"thinking": "c"})
        await store.append_streams([(session_id, "melchior", chunk)])  # the chunk script too
        for channel in (owner_channel, other):
            assert (await next_notification(channel)).startswith(f"{session_id}\n3\n".encode())
            assert (await next_notification(channel)).startswith(f"{session_id}\n4\n".encode())
            assert await channel.get_message(timeout=0.2) is None
        # The opener's viewer leaves: its instance is no longer notified.
        await store.viewers.leave("someone-else", [(session_id, OPENER)])
        await store.append_stream(session_id, "melchior", {"thinking": "d"})
        assert (await next_notification(owner_channel)).startswith(f"{session_id}\n5\n".encode())
        assert await other.get_message(timeout=0.2) is None
    finally:
        await other.aclose()


async def test_a_session_without_viewers_is_published_to_its_owner(
    store: Store, owner_channel: PubSub
) -> None:
    """A session opened by a gateway from before viewers (no viewer registered), or that
    every viewer left: its messages go to the instance that opened it, as they used to."""
    session_id = new_session_id()
    await store.create_session(session_id, APP, OWNER, ["melchior"], now_ms() + TIMEOUT_MS, None)
    assert await store.viewers.entries(session_id) == []
    await store.append_stream(session_id, "melchior", {"thinking": "a"})
    chunk = frames.stream_tail("melchior", {"thinking": "b"})
    await store.append_streams([(session_id, "melchior", chunk)])
    for seq in (1, 2, 3):
        assert (await next_notification(owner_channel)).startswith(f"{session_id}\n{seq}\n".encode())
    assert await owner_channel.get_message(timeout=0.2) is None


async def test_enqueued_requests_decode_with_request_from_fields(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    session_id = new_session_id()
    deadline = now_ms() + 5000
    await store.enqueue_request(session_id, "melchior", "Is it ünïcode? ☃", deadline, APP)
    await store.enqueue_request(session_id, "melchior", "", deadline, APP)
    entries = await redis_client.xrange(keys.requests("melchior", APP))
    assert len(entries) == 2
    decoded = [Request.from_fields(entry_id, fields) for entry_id, fields in entries]
    assert decoded[0] == Request(
        message_id=entries[0][0],
        session_id=session_id,
        agent_id="melchior",
        user_input="Is it ünïcode? ☃",
        deadline_ms=deadline,
        appid=APP,
    )
    assert decoded[1].user_input == ""


# -- two gateway instances on one Redis --------------------------------------------------------


async def test_two_gateways_each_deliver_only_their_own_sessions(
    settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_worker: Callable[..., Awaitable[Worker]],
) -> None:
    first = await start_gateway(settings)
    second = await start_gateway(settings)
    assert first.gateway is not None
    assert second.gateway is not None
    assert first.gateway.instance_id != second.gateway.instance_id
    await start_worker(demo_agents(delay_s=0.01))
    per_client = 3

    async def client(handle: GatewayHandle, tag: str) -> dict[str, Any]:
        async with await handle.connect() as ws:
            for i in range(per_client):
                question = "Should we deploy the untested weapon?" if i % 2 else "Shall we have tea?"
                await send(ws, judgement_message(AGENTS, question, request_id=f"{tag}-{i}-{uuid.uuid4()}"))
            return await collect_sessions(ws, per_client)

    got_first, got_second = await asyncio.gather(client(first, "a"), client(second, "b"))
    assert len(got_first) == per_client
    assert len(got_second) == per_client
    assert not set(got_first) & set(got_second)
    for tag, records in (("a", got_first), ("b", got_second)):
        for record in records.values():
            assert_well_formed(record, AGENTS)
            assert record.messages[0]["request_id"].startswith(f"{tag}-")
            verdict = record.complete["data"]["verdict"]
            assert verdict in ("approve", "reject")


async def test_a_session_started_on_one_gateway_resumes_on_the_other(
    settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_worker: Callable[..., Awaitable[Worker]],
) -> None:
    first = await start_gateway(settings)
    second = await start_gateway(settings)
    await start_worker(demo_agents(delay_s=0.05))
    async with await first.connect() as ws:
        await send(ws, judgement_message(AGENTS, "Should we deploy the untested weapon?"))
        seen = [await recv(ws) for _ in range(4)]
    assert [m["seq"] for m in seen] == [1, 2, 3, 4]
    session_id = seen[0]["session_id"]
    async with await second.connect() as ws:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 4})
        record = SessionRecord(list(seen))
        while record.messages[-1]["type"] != "agent_judgement_complete":
            message = await recv(ws)
            assert "error" not in message, message
            assert message["session_id"] == session_id
            record.messages.append(message)
    assert_well_formed(record, AGENTS)  # the seqs continue at 5 with no gap and no duplicate
    assert record.complete["data"]["verdict"] == "reject"


async def test_chunk_appends_refresh_the_session_expiries_at_most_once_a_second(
    store: Store, keys: Keys, redis_client: Redis
) -> None:
    # Six PEXPIREs per chunk call were a third of Redis's work per unbatched chunk: the
    # first call after the creation refreshes them, the next ones within the second do not.
    session_id = await new_session(store, ["melchior"])
    await store.append_streams([(session_id, "melchior", frames.stream_tail("melchior", {"thinking": "0"}))])
    marker = uuid.uuid4().hex
    async with redis_client.monitor() as monitor:
        for i in range(1, 4):
            tail = frames.stream_tail("melchior", {"thinking": str(i)})
            await store.append_streams([(session_id, "melchior", tail)])
        await redis_client.echo(marker)
        seen: list[str] = []
        while marker not in (seen[-1] if seen else ""):
            seen.append(str((await asyncio.wait_for(monitor.next_command(), 10))["command"]))
    if any(command.startswith("PEXPIRE") for command in seen):
        # A slow machine may cross the second once in the three calls: never twice.
        assert sum(command.startswith("PEXPIRE") for command in seen) == len(keys.session(session_id).all())
    assert sum(command.startswith("XADD") for command in seen) == 3
    for key in keys.session(session_id).all():
        if key != keys.session(session_id).results and key != keys.session(session_id).viewers:
            assert await redis_client.pttl(key) > RETENTION_S * 1000, key


async def test_a_batch_of_chunks_is_one_call_one_notification_in_order(
    store: Store, owner_channel: PubSub, redis_client: Redis
) -> None:
    first = await new_session(store, ["melchior", "casper"])
    second = await new_session(store, ["melchior"])
    await store.append_final(second, "melchior", ResultCode.OK, {})  # second: no chunk accepted now
    # Two accepted messages, then the second session's final and complete.
    kinds = [decode_notification(await next_notification(owner_channel)).messages[0].type for _ in range(4)]
    assert kinds.count(b"agent_judgement_accepted") == 2
    tails = [
        frames.stream_tail(a, {"thinking": str(i)}) for i, a in enumerate(["melchior", "casper", "melchior"])
    ]
    results = await store.append_streams(
        [
            (first, "melchior", tails[0]),
            (second, "melchior", tails[0]),
            (first, "casper", tails[1]),
            (first, "melchior", tails[2]),
        ]
    )
    assert [getattr(r, "seq", r) for r in results] == [2, None, 3, 4]
    payload = await next_notification(owner_channel)
    decoded = decode_notification(payload)
    assert decoded.session_id == first
    assert [m.seq for m in decoded.messages] == [2, 3, 4]
    logged = await store.read_log(first, 2)
    assert [(s, k, f) for s, k, f in logged] == [(m.seq, m.type, m.frame) for m in decoded.messages]
    assert [orjson.loads(f)["data"]["thinking"] for _, _, f in logged] == ["0", "1", "2"]
    # Every key the session has so far has an expiry (results appear with the first final).
    session_keys = Keys(store.keys.prefix).session(first)
    for key in (session_keys.log, session_keys.seq, session_keys.meta, session_keys.pending):
        assert await redis_client.pttl(key) > 0


async def test_a_session_left_between_its_last_final_and_its_completion_is_completed(
    store: Store, redis_client: Redis
) -> None:
    """The last final and the completion are two script calls: if the second never runs
    (a failure, a lost reply), the final's retry and the deadline sweep both complete it."""
    for repair in ("retry", "sweep"):
        session_id = await new_session(store, ["melchior"])
        # The final alone, as the first of the two calls writes it.
        summary = orjson.dumps({"result_code": 0, "decision": "approve"})
        tail = frames.final_tail("melchior", 0, {"decision": "approve"})
        await store._run_append(session_id, "final", "agent_judgement_final", tail, "melchior", summary)
        assert [orjson.loads(f)["type"] for _, _, f in await store.read_log(session_id, 1)][-1] == (
            "agent_judgement_final"
        )
        if repair == "retry":
            again = await store.append_final(session_id, "melchior", ResultCode.OK, {"decision": "approve"})
            assert again.seq is None  # refused as a second final
        else:
            sweep = asyncio.create_task(
                sweep_deadlines(store, 0.1, lambda: Backoff(0.01, 0.1), now=lambda: now_ms() + 3_600_000)
            )
            try:
                for _ in range(100):
                    info = await store.session_info(session_id)
                    if info is not None and info.completed:
                        break
                    await asyncio.sleep(0.05)
            finally:
                sweep.cancel()
                await asyncio.gather(sweep, return_exceptions=True)
        logged = [orjson.loads(f) for _, _, f in await store.read_log(session_id, 1)]
        assert [m["type"] for m in logged] == [
            "agent_judgement_accepted",
            "agent_judgement_final",
            "agent_judgement_complete",
        ], repair
        assert logged[-1]["data"]["verdict"] == "approve"
        assert logged[-1]["seq"] == 3
