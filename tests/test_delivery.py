"""DESIGN §3 delivery guarantees, end to end: resume, disconnect, cancel, retention, slow
consumers and timeouts, with real uvicorn gateways (in-process and subprocesses), real
workers and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import websockets
from redis.asyncio import Redis

from magi_gateway.agents import BenchAgent, demo_agents
from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.keys import WORKER_GROUP, Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import (
    DEMO,
    Gated,
    Sloth,
    assert_nothing_more,
    collect_until_complete,
    eventually,
    logged,
    make_quick,
    quick,
    read_until_closed,
    record_of,
    scan_keys,
    stalled_connection,
    wait_logged_complete,
)
from ._support import (
    APPID,
    SECRET,
    GatewayHandle,
    SessionRecord,
    assert_clean_error,
    assert_well_formed,
    judge,
    judgement_message,
    recv,
    send,
    spawn_gateway,
    stop_process,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix), retention_s=settings.session_retention_s)


def resume(session_id: str, last_seq: int) -> dict[str, Any]:
    return {"type": "resume", "session_id": session_id, "last_seq": last_seq}


def cancel(session_id: str) -> dict[str, Any]:
    return {"type": "cancel", "session_id": session_id}


async def logged_at_least(store: Store, session_id: str, count: int) -> bool:
    return len(await store.read_log(session_id, 1)) >= count


# -- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same-instance", "other-instance"])
async def test_resume_gets_exactly_the_missed_messages_then_live_ones(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store, where: str
) -> None:
    gated = Gated("gated", before=4, after=3)
    await start_worker([gated.agent])
    first = await start_gateway(settings)
    second = first if where == "same-instance" else await start_gateway(settings)

    async with await first.connect() as ws:
        await send(ws, judgement_message(["gated"]))
        seen = [await recv(ws) for _ in range(3)]  # accepted and two chunks
    assert [m["seq"] for m in seen] == [1, 2, 3]
    session_id = seen[0]["session_id"]
    # Chunks 4 and 5 are logged while nobody is connected; the agent then waits at its gate.
    await eventually(lambda: logged_at_least(store, session_id, 5), what="the chunks before the gate")

    async with await second.connect() as ws:
        await send(ws, resume(session_id, 3))
        replayed = [await recv(ws) for _ in range(2)]
        assert [m["seq"] for m in replayed] == [4, 5]
        await assert_nothing_more(ws)  # the replay stopped at the end of the log
        info = await store.session_info(session_id)
        assert info is not None
        # The resuming connection is one more viewer: its instance is notified from now on.
        viewers = await store.viewers.entries(session_id)
        assert second.gateway.instance_id in {instance for instance, _ in viewers}  # type: ignore[union-attr]
        gated.gate.set()
        live = await collect_until_complete(ws, session_id)
        await assert_nothing_more(ws)  # no duplicate follows the complete

    record = record_of(seen + replayed + live)
    assert_well_formed(record, ["gated"])
    assert [m["seq"] for m in live] == list(range(6, 6 + len(live)))
    thinking = [m["data"]["thinking"] for m in record.of_type("agent_judgement_stream")]
    assert thinking == [f"before {i}" for i in range(4)] + [f"after {i}" for i in range(3)]
    assert record.finals["gated"]["result_code"] == 0
    assert record.messages == await logged(store, session_id)
    assert gated.invocations == 1

    # last_seq 0 replays the whole session, on either instance.
    for handle in {id(first): first, id(second): second}.values():
        async with await handle.connect() as ws:
            await send(ws, resume(session_id, 0))
            replay = [await recv(ws) for _ in record.messages]
            await assert_nothing_more(ws)
        assert replay == record.messages


async def test_resume_from_another_appid_is_not_found_and_takes_nothing(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    async with await gateway.connect() as owner, await gateway.connect("intruder-app") as intruder:
        await send(owner, judgement_message(["gated"]))
        accepted = await recv(owner)
        session_id = accepted["session_id"]
        for last_seq in (0, 1, 10**6):
            await send(intruder, resume(session_id, last_seq))
            error = await recv(intruder)
            assert_clean_error(error, "session_not_found")
            assert error["session_id"] == session_id
        gated.gate.set()
        rest = await collect_until_complete(owner, session_id)
        await assert_nothing_more(intruder)  # none of the session leaked to the other app
    record = record_of([accepted, *rest])
    assert_well_formed(record, ["gated"])
    assert record.messages == await logged(store, session_id)


async def test_resume_of_an_expired_session_is_not_found(
    settings: Settings, start_gateway: StartGateway, store: Store
) -> None:
    short = settings.model_copy(update={"session_retention_s": 1})
    gateway = await start_gateway(short)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["nobody"])
        session_id = record.messages[0]["session_id"]
        # Within the retention the finished session can still be resumed...
        await send(ws, resume(session_id, 0))
        assert [await recv(ws) for _ in record.messages] == record.messages

        async def expired() -> bool:
            return await store.session_info(session_id) is None

        await eventually(expired, timeout=6, what="the session to expire")
        # ...after it, not.
        await send(ws, resume(session_id, 0))
        error = await recv(ws)
        assert_clean_error(error, "session_not_found")
        assert error["session_id"] == session_id
        await assert_nothing_more(ws)


# -- disconnect is not cancel --------------------------------------------------------------------


async def test_client_disconnect_is_not_cancel(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent, *demo_agents(delay_s=0.02)])
    agents = ["gated", *DEMO]
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(agents, "Shall we have tea?"))
        await send(ws, {"type": "ping"})  # frames are handled in order: the pong follows the start
        seen = []
        while (message := await recv(ws)).get("type") != "pong":
            seen.append(message)
    session_id = seen[0]["session_id"]
    assert seen[0]["type"] == "agent_judgement_accepted"
    # The client is gone before any agent could finish (gated waits): the session runs on.
    assert "gated" not in record_of(seen).finals
    gated.gate.set()
    log = await wait_logged_complete(store, session_id)
    record = record_of(log)
    assert_well_formed(record, agents)
    assert {a: f["result_code"] for a, f in record.finals.items()} == dict.fromkeys(agents, 0)
    assert record.complete["data"]["verdict"] == "approve"
    assert gated.invocations == 1
    # A later resume delivers everything after the accepted message.
    async with await gateway.connect() as ws:
        await send(ws, resume(session_id, 1))
        rest = await collect_until_complete(ws, session_id)
        await assert_nothing_more(ws)
    assert rest == log[1:]


async def test_a_judgement_is_accepted_before_the_answer_to_the_next_frame(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    # Frames are answered in the order they came: the accepted message, which the gateway
    # hands over once the session is in Redis (its notification may come later), precedes
    # the pong of a ping sent after the judgement; it came after the pong in a loaded CI.
    await start_worker(demo_agents(delay_s=0.001))
    async with await gateway.connect() as ws:
        for turn in range(10):
            await send(ws, judgement_message(DEMO, f"Turn {turn}?"))
            await send(ws, {"type": "ping"})
            first = await ws.recv()
            accepted = orjson.loads(first)
            assert accepted.get("type") == "agent_judgement_accepted", (turn, accepted)
            session_id = accepted["session_id"]
            messages = [accepted]
            pong = False
            while not (pong and messages[-1]["type"] == "agent_judgement_complete"):
                message = await recv(ws)
                if message.get("type") == "pong":
                    pong = True
                else:
                    messages.append(message)
            # Each message once, in order; the accepted exactly as logged.
            assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1)), turn
            (logged_first,) = await store.read_log(session_id, 1, count=1)
            assert logged_first[2] == (first.encode() if isinstance(first, str) else first)
            assert messages == await logged(store, session_id)


async def test_disconnect_while_the_gateway_still_starts_the_session_is_not_cancel(
    settings: Settings,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = settings.model_copy(update={"judgement_timeout_s": 2})
    gateway = await start_gateway(fast)
    await start_worker([make_quick("first"), make_quick("second")], settings=fast)
    assert gateway.gateway is not None
    gateway_store = gateway.gateway.store
    enqueue = gateway_store.intake.enqueue

    async def slow_enqueue(*args: Any, **kwargs: Any) -> bool:
        await asyncio.sleep(0.3)  # a slow Redis round trip widens the window
        return await enqueue(*args, **kwargs)

    monkeypatch.setattr(gateway_store.intake, "enqueue", slow_enqueue)
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(["first", "second"]))
        accepted = await recv(ws)
    # Closed right after accepted, while the gateway still queues the requests.
    log = await wait_logged_complete(store, accepted["session_id"])
    record = record_of(log)
    assert_well_formed(record, ["first", "second"])
    assert {a: f["result_code"] for a, f in record.finals.items()} == {"first": 0, "second": 0}


# -- cancel --------------------------------------------------------------------------------------


async def test_cancel_stops_pending_agents_and_keeps_finished_ones(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store, redis_client: Redis
) -> None:
    sloth_a, sloth_b = Sloth("sloth-a"), Sloth("sloth-b")
    await start_worker([quick, sloth_a.agent, sloth_b.agent])
    agents = ["quick", "sloth-a", "sloth-b"]
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(agents))
        record = SessionRecord()
        streamed: set[str] = set()
        # Until quick has its final and both sloths are demonstrably working.
        while "quick" not in record.finals or streamed != {"sloth-a", "sloth-b"}:
            message = await recv(ws)
            assert "error" not in message, message
            record.messages.append(message)
            if message["type"] == "agent_judgement_stream" and message["agent_id"].startswith("sloth"):
                streamed.add(message["agent_id"])
        session_id = record.messages[0]["session_id"]
        await send(ws, cancel(session_id))
        record.messages.extend(await collect_until_complete(ws, session_id))
        # Cancelling a finished session is an error naming it.
        await send(ws, cancel(session_id))
        error = await recv(ws)
        assert_clean_error(error, "session_completed")
        assert error["session_id"] == session_id
        await assert_nothing_more(ws)

    assert_well_formed(record, agents)
    finals = record.finals
    assert finals["quick"]["result_code"] == 0
    assert finals["quick"]["data"]["decision"] == "approve"
    for name in ("sloth-a", "sloth-b"):
        assert finals[name]["result_code"] == 4
        assert isinstance(finals[name]["data"]["error"], str)
        assert finals[name]["data"]["error"]
        final_at = record.messages.index(finals[name])
        assert all(m.get("agent_id") != name for m in record.messages[final_at + 1 :])
    assert record.complete["data"] == {
        "verdict": "approve",
        "results": {
            "quick": {"result_code": 0, "decision": "approve"},
            "sloth-a": {"result_code": 4},
            "sloth-b": {"result_code": 4},
        },
    }
    assert record.messages == await logged(store, session_id)

    # The workers really stopped the agents (not merely ignored their output).
    for sloth in (sloth_a, sloth_b):
        await asyncio.wait_for(sloth.stopped.wait(), 3)
        assert sloth.outcome == "cancelled", sloth.name
        assert sloth.ctx_cancelled is True
    keys = Keys(store.keys.prefix)

    async def acknowledged() -> bool:
        for name in ("sloth-a", "sloth-b"):
            pending = await redis_client.xpending(keys.requests(name, APPID), WORKER_GROUP)
            if pending["pending"]:
                return False
        return True

    await eventually(acknowledged, timeout=5, what="the cancelled requests to be acknowledged")


class _DeafWorker(Worker):
    """A worker whose cancel notices never arrive (as when one comes late)."""

    def _cancel_session(self, session_id: SessionId) -> None:
        pass


async def test_an_agent_that_streams_before_the_cancel_notice_arrives_sees_a_cancel(
    gateway: GatewayHandle, store: Store, redis_client: Redis, settings: Settings
) -> None:
    sloth = Sloth("sloth")
    worker = _DeafWorker([sloth.agent], settings)
    running = asyncio.create_task(worker.run())

    async def live() -> bool:
        return bool((await worker.store.liveness.live_worker_counts(["sloth"]))["sloth"])

    try:
        await eventually(live, timeout=5, what="the worker's first heartbeat")
        async with await gateway.connect() as ws:
            await send(ws, judgement_message(["sloth"]))
            accepted = await recv(ws)
            session_id = accepted["session_id"]
            while (await recv(ws))["type"] != "agent_judgement_stream":
                pass
            await send(ws, cancel(session_id))
            got = await collect_until_complete(ws, session_id)
        assert [m["type"] for m in got][-2:] == ["agent_judgement_final", "agent_judgement_complete"]
        assert got[-2]["result_code"] == 4
        # The agent's next chunk is refused: it learns of the cancel from its session.
        await asyncio.wait_for(sloth.stopped.wait(), 5)
        assert sloth.outcome == "cancelled"
        assert sloth.ctx_cancelled is True
        stream = Keys(store.keys.prefix).requests(AgentId("sloth"), AppId(APPID))

        async def acknowledged() -> bool:
            return (await redis_client.xpending(stream, WORKER_GROUP))["pending"] == 0

        await eventually(acknowledged, timeout=5, what="the cancelled request to be acknowledged")
    finally:
        worker.stop()
        await running


async def test_cancel_of_unknown_and_of_another_apps_session_is_not_found(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    sloth = Sloth("sloth")
    await start_worker([sloth.agent])
    async with await gateway.connect() as owner, await gateway.connect("intruder-app") as intruder:
        await send(owner, judgement_message(["sloth"]))
        accepted = await recv(owner)
        session_id = accepted["session_id"]
        await asyncio.wait_for(sloth.started.wait(), 5)

        await send(intruder, cancel(session_id))
        error = await recv(intruder)
        assert_clean_error(error, "session_not_found")
        assert error["session_id"] == session_id

        unknown = "0123456789abcdef" * 2
        await send(intruder, cancel(unknown))
        error = await recv(intruder)
        assert_clean_error(error, "session_not_found")
        assert error["session_id"] == unknown

        # The intruder's cancel changed nothing: the agent still works, the session is open.
        await asyncio.sleep(0.3)
        assert not sloth.stopped.is_set()
        info = await store.session_info(session_id)
        assert info is not None
        assert not info.completed
        assert info.pending == {"sloth"}

        await send(owner, cancel(session_id))
        rest = await collect_until_complete(owner, session_id)
        # Another app learns nothing from a completed session either.
        await send(intruder, cancel(session_id))
        assert_clean_error(await recv(intruder), "session_not_found")
        await assert_nothing_more(owner)

    record = record_of([accepted, *rest])
    assert_well_formed(record, ["sloth"])
    assert record.finals["sloth"]["result_code"] == 4
    await asyncio.wait_for(sloth.stopped.wait(), 3)
    assert sloth.ctx_cancelled is True


# -- retention: no key lives forever -------------------------------------------------------------


async def test_every_key_expires_and_sessions_are_kept_for_the_retention(
    settings: Settings,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    redis_client: Redis,
) -> None:
    fast = settings.model_copy(update={"judgement_timeout_s": 1})
    gateway = await start_gateway(fast)
    slow, doomed = Sloth("slow"), Sloth("doomed")
    await start_worker([quick, slow.agent, doomed.agent], settings=fast)
    async with await gateway.connect() as ws:
        done = await judge(ws, ["quick"], request_id="keyed-request")
        timed_out = await judge(ws, ["slow"])
        unknown = await judge(ws, ["nobody"])
        await send(ws, judgement_message(["doomed"]))
        accepted = await recv(ws)
        await send(ws, cancel(accepted["session_id"]))
        cancelled = record_of([accepted, *await collect_until_complete(ws, accepted["session_id"])])
    codes = {
        name: record.finals[agent_id]["result_code"]
        for name, record, agent_id in (
            ("done", done, "quick"),
            ("timed_out", timed_out, "slow"),
            ("unknown", unknown, "nobody"),
            ("cancelled", cancelled, "doomed"),
        )
    }
    assert codes == {"done": 0, "timed_out": 2, "unknown": 3, "cancelled": 4}
    await asyncio.wait_for(slow.stopped.wait(), 5)
    await asyncio.wait_for(doomed.stopped.wait(), 5)

    prefix = fast.redis_key_prefix
    # Session and idempotency keys start with the prefix, the shared ones with {prefix}.
    keys = await scan_keys(redis_client, f"{prefix}*") + await scan_keys(redis_client, f"{{{prefix}}}*")
    ttls = {key.decode(): await redis_client.pttl(key) for key in keys}
    ttls = {key: ttl for key, ttl in ttls.items() if ttl != -2}  # -2: expired meanwhile
    forever = sorted(key for key, ttl in ttls.items() if ttl < 0)
    assert forever == [], f"keys without expiry: {forever}"
    # The scan saw every kind of key the run wrote.
    session_ids = [r.messages[0]["session_id"] for r in (done, timed_out, unknown, cancelled)]
    for session_id in session_ids:
        assert f"{prefix}:s:{{{session_id}}}:log" in ttls
        assert f"{prefix}:s:{{{session_id}}}:meta" in ttls
    assert Keys(prefix).idempotency(AppId("test-app"), "keyed-request") in ttls
    assert Keys(prefix).requests(AgentId("quick"), AppId("test-app")) in ttls
    assert Keys(prefix).request_apps(AgentId("quick")) in ttls
    assert f"{{{prefix}}}:a:quick:workers" in ttls
    assert f"{{{prefix}}}:agents" in ttls
    # Completed sessions are kept for the retention, not longer.
    retention_ms = fast.session_retention_s * 1000
    session_ttls = {k: t for k, t in ttls.items() if k.startswith(f"{prefix}:s:")}
    assert len(session_ttls) >= 4 * 4  # log, seq, meta, results of four sessions
    assert all(0 < t <= retention_ms for t in session_ttls.values()), session_ttls


async def test_session_keys_are_gone_soon_after_a_short_retention(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, redis_client: Redis
) -> None:
    short = settings.model_copy(update={"session_retention_s": 1})
    gateway = await start_gateway(short)
    await start_worker([quick], settings=short)
    async with await gateway.connect() as ws:
        first = await judge(ws, ["quick"])
        second = await judge(ws, ["quick", "nobody"])
    assert first.finals["quick"]["result_code"] == 0
    assert second.finals["nobody"]["result_code"] == 3
    pattern = f"{short.redis_key_prefix}:s:*"

    async def gone() -> bool:
        return not await scan_keys(redis_client, pattern)

    await eventually(gone, timeout=4, what="the session keys to expire")


# -- slow consumers ------------------------------------------------------------------------------

#: Enough data that the kernel's socket buffers (up to 4 MB send buffer on the gateway's side)
#: cannot absorb it all, so the gateway's own bounded buffer overflows.
SLOW_CHUNKS = 500
SLOW_CHUNK_BYTES = 16_000


async def stall_until_closed_1013(
    handle: GatewayHandle, store: Store, max_outbound: int
) -> tuple[str, list[dict[str, Any]]]:
    """Start a big session on a stalled connection; return it and what the client then read."""
    ws = await stalled_connection(handle)
    async with ws:
        hello = await recv(ws)
        connection_id = hello["connection_id"]
        await send(ws, judgement_message(["bench"]))
        accepted = await recv(ws)
        session_id = accepted["session_id"]
        # The client reads nothing more; meanwhile the session completes in Redis.
        await wait_logged_complete(store, session_id, timeout=30)
        gateway = handle.gateway
        assert gateway is not None
        connection = gateway._connections.get(connection_id)  # type: ignore[arg-type]
        assert connection is not None
        assert connection.closing, "the gateway kept buffering for a client that does not read"
        assert len(connection.outbox) <= max_outbound
        # Reading again: what was in flight, then the 1013 close.
        in_flight, code = await read_until_closed(ws, SLOW_CHUNKS + 10)
        assert code == 1013
        received = [accepted, *in_flight]
    assert [m["seq"] for m in received] == list(range(1, len(received) + 1))
    assert len(received) < SLOW_CHUNKS  # really cut short
    return session_id, received


async def test_slow_consumer_is_closed_1013_and_other_clients_are_unaffected(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    limited = settings.model_copy(update={"max_outbound_messages": 16})
    gateway = await start_gateway(limited)
    await start_worker([BenchAgent(chunks=SLOW_CHUNKS, chunk_bytes=SLOW_CHUNK_BYTES)], settings=limited)
    await start_worker(demo_agents(delay_s=0.05), settings=limited)

    async def bystander() -> SessionRecord:
        async with await gateway.connect("bystander-app") as ws:
            return await judge(ws, DEMO, "Shall we have tea?", timeout=30)

    (session_id, received), other = await asyncio.gather(
        stall_until_closed_1013(gateway, store, 16), bystander()
    )
    assert_well_formed(other, DEMO)
    assert other.complete["data"]["verdict"] == "approve"
    # Nothing is lost: the log holds every message, the client's part is a prefix of it.
    log = await logged(store, session_id)
    assert len(log) == SLOW_CHUNKS + 3
    assert log[: len(received)] == received
    assert_well_formed(record_of(log), ["bench"])


async def test_slow_consumer_resumes_with_nothing_lost(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    limited = settings.model_copy(update={"max_outbound_messages": 16})
    gateway = await start_gateway(limited)
    await start_worker([BenchAgent(chunks=SLOW_CHUNKS, chunk_bytes=SLOW_CHUNK_BYTES)], settings=limited)
    session_id, received = await stall_until_closed_1013(gateway, store, 16)
    last_seq = received[-1]["seq"]
    async with websockets.connect(gateway.ws_url(), max_size=None) as ws:
        assert (await recv(ws))["type"] == "connection_established"
        await send(ws, resume(session_id, last_seq))
        rest = await collect_until_complete(ws, session_id, timeout=20)
        await assert_nothing_more(ws)
    record = record_of(received + rest)
    assert_well_formed(record, ["bench"])
    assert len(record.messages) == SLOW_CHUNKS + 3
    assert record.messages == await logged(store, session_id)


# -- timeouts ------------------------------------------------------------------------------------


async def test_timeout_final_for_the_slow_agent_only(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    fast = settings.model_copy(update={"judgement_timeout_s": 1})
    gateway = await start_gateway(fast)
    slow = Sloth("slow")
    await start_worker([quick, slow.agent], settings=fast)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["slow", "quick"])
    assert_well_formed(record, ["slow", "quick"])
    assert record.finals["quick"]["result_code"] == 0
    assert record.finals["slow"]["result_code"] == 2
    assert record.finals["slow"]["data"]["error"]
    assert record.complete["data"]["verdict"] == "approve"
    await asyncio.wait_for(slow.stopped.wait(), 5)  # the worker stopped it at the deadline too
    assert slow.outcome in ("cancelled", "closed")


async def test_timeout_is_enforced_after_the_starting_gateway_died(
    redis_url: str, settings: Settings, start_worker: StartWorker, store: Store
) -> None:
    fast = settings.model_copy(update={"judgement_timeout_s": 1})
    env = {
        "REDIS_URL": redis_url,
        "FIXED_SECRET": SECRET,
        "REDIS_KEY_PREFIX": fast.redis_key_prefix,
        "JUDGEMENT_TIMEOUT_S": "1",
    }
    handles: list[GatewayHandle] = []
    try:
        for _ in range(2):
            handles.append(await asyncio.to_thread(spawn_gateway, env))
        first, second = handles
        assert first.process is not None
        slow = Sloth("slow")
        await start_worker([slow.agent], settings=fast)
        async with await first.connect() as ws:
            await send(ws, judgement_message(["slow"]))
            accepted = await recv(ws)
            await asyncio.wait_for(slow.started.wait(), 5)
            first.process.kill()  # no shutdown, no sweep of its own: only the other instance is left
            await asyncio.to_thread(first.process.wait, 10)
            await read_until_closed(ws, 100)  # what was already received, then the drop
        session_id = accepted["session_id"]
        log = await wait_logged_complete(store, session_id, timeout=10)
        record = record_of(log)
        assert_well_formed(record, ["slow"])
        assert record.finals["slow"]["result_code"] == 2
        assert record.finals["slow"]["data"]["error"]
        # The surviving instance serves the session to a resuming client.
        async with await second.connect() as ws:
            await send(ws, resume(session_id, 0))
            assert await collect_until_complete(ws, session_id) == log
    finally:
        for handle in handles:
            assert handle.process is not None
            stop_process(handle.process)


async def test_a_notification_that_is_not_utf8_is_skipped_and_the_connection_kept(
    gateway: GatewayHandle, start_worker: StartWorker, redis_client: Redis, settings: Settings
) -> None:
    """A frame that is not valid UTF-8 dropped the client without a close frame (#12 item 14)."""
    assert gateway.gateway is not None
    gated = Gated("gated", before=1, after=1)
    await start_worker([gated.agent])
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(["gated"]))
        accepted = await recv(ws)
        session_id = accepted["session_id"]
        assert (await recv(ws))["data"]["thinking"] == "before 0"
        channel = Keys(settings.redis_key_prefix).gateway_channel(gateway.gateway.instance_id)
        # seq 3 as the gateway would expect next, with bytes that are no UTF-8 text.
        await redis_client.publish(
            channel, f"{session_id}\n3\nagent_judgement_stream\n".encode() + b"\xff\xfe{"
        )
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        assert ws.close_code is None
        gated.gate.set()  # the session goes on and completes on the same connection
        rest = await collect_until_complete(ws, session_id)
        # Seq 3 counts as delivered (skipped), so the session continues after it, in order.
        assert [m["seq"] for m in rest] == list(range(4, 4 + len(rest)))
        assert rest[-1]["type"] == "agent_judgement_complete"
