"""The worker SDK and runner, with real Redis (and a real gateway where a client is involved)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from redis.asyncio import Redis

from magi_gateway import Agent, Context, Judgement, JudgementClosed, agent
from magi_gateway._util import now_ms
from magi_gateway.agents import BenchAgent, DemoAgent
from magi_gateway.cli.main import load_agents
from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.core.session import new_session_id
from magi_gateway.redis.keys import WORKER_GROUP, Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.appender import ChunkAppender
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import FunctionAgent

from . import agents_for_tests
from ._support import APPID, GatewayHandle, assert_well_formed, judge, recv

ROOT = Path(__file__).resolve().parents[1]
APP = "worker-tests"

StartWorker = Callable[..., Awaitable[Worker]]
StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix), retention_s=settings.session_retention_s)


async def queue_sessions(
    store: Store, agent_id: str, inputs: list[str], timeout_ms: int = 30_000
) -> list[str]:
    """Create one session per input for ``agent_id`` and queue its request, as a gateway would."""
    sessions = []
    for user_input in inputs:
        session_id = new_session_id()
        deadline = now_ms() + timeout_ms
        await store.create_session(session_id, APP, "no-gateway", [agent_id], deadline, None)
        await store.enqueue_request(session_id, agent_id, user_input, deadline, APP)
        sessions.append(session_id)
    return sessions


async def session_log(store: Store, session_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, 1)]


async def run_burst(worker: Worker, timeout: float = 30) -> None:
    await asyncio.wait_for(worker.run(), timeout)


# -- agents answer ---------------------------------------------------------------------------


async def test_function_and_class_agents_answer(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker([agents_for_tests.echo, agents_for_tests.KlassAgent()])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["echo", "klass"], "hello there")
    assert_well_formed(record, ["echo", "klass"])
    finals = record.finals
    assert finals["echo"]["result_code"] == 0
    assert finals["echo"]["data"] == {"judgement": "echo: hello there", "decision": "approve"}
    assert finals["klass"]["result_code"] == 0
    assert finals["klass"]["data"] == {
        "judgement": "klass rejects hello there",
        "kind": "class",
        "decision": "reject",
    }
    chunks = [(m["agent_id"], m["data"]["thinking"]) for m in record.of_type("agent_judgement_stream")]
    assert ("echo", "echo is reading 'hello there'") in chunks
    assert [c for a, c in chunks if a == "klass"] == ["klass: first thought", "klass: second thought"]
    assert record.complete["data"]["verdict"] == "abstain"  # one approve, one reject: a tie


async def test_plain_string_answer_is_a_judgement_without_decision(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker([agents_for_tests.plain])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["plain"])
    assert_well_formed(record, ["plain"])
    final = record.finals["plain"]
    assert final["result_code"] == 0
    assert final["data"] == {"judgement": "just text"}
    assert record.complete["data"] == {"verdict": "abstain", "results": {"plain": {"result_code": 0}}}


async def test_agent_error_text_reaches_the_client(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker([agents_for_tests.refuser])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["refuser"])
    assert_well_formed(record, ["refuser"])
    final = record.finals["refuser"]
    assert final["result_code"] == 1
    assert final["data"]["error"] == "nope"
    assert record.complete["data"]["results"] == {"refuser": {"result_code": 1}}


async def test_unexpected_exception_text_stays_in_the_worker(
    gateway: GatewayHandle, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    await start_worker([agents_for_tests.crasher])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["crasher"])
    assert_well_formed(record, ["crasher"])
    final = record.finals["crasher"]
    assert final["result_code"] == 1
    error = final["data"]["error"]
    assert isinstance(error, str)
    assert error
    raw = orjson.dumps(record.messages).decode()
    for leak in (agents_for_tests.SECRET_DETAIL, "hunter2", "RuntimeError", "Traceback"):
        assert leak not in raw
    # ...but the operator can find it in the worker's log.
    assert any(agents_for_tests.SECRET_DETAIL in (r.exc_text or str(r.exc_info)) for r in caplog.records)


async def test_agent_slower_than_the_timeout_gets_one_timeout_final(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    fast = settings.model_copy(update={"judgement_timeout_s": 1})
    finished = asyncio.Event()
    closed: list[bool] = []

    @agent("sloth")
    async def sloth(user_input: str, ctx: Context) -> Judgement:
        await ctx.think("starting")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # A badly behaved agent: it ignores the cancellation at the deadline and
            # carries on, so its late output reaches the store and must be refused there.
            await asyncio.sleep(0.5)
        try:
            await ctx.think("too late")
        except JudgementClosed:
            closed.append(True)
        finished.set()
        return Judgement("late answer", decision="approve")

    gateway = await start_gateway(fast)
    await start_worker([sloth], settings=fast)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["sloth"], timeout=20)
        assert_well_formed(record, ["sloth"])
        final = record.finals["sloth"]
        assert final["result_code"] == 2
        assert final["data"]["error"]
        assert record.complete["data"]["results"] == {"sloth": {"result_code": 2}}
        assert [m["data"]["thinking"] for m in record.of_type("agent_judgement_stream")] == ["starting"]
        # The agent goes on after the deadline; nothing more arrives for the session.
        await asyncio.wait_for(finished.wait(), 10)
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=0.3)
    assert closed == [True]  # the agent was told its output is no longer wanted
    session_id = record.messages[0]["session_id"]
    logged = await session_log(store, session_id)
    assert logged == record.messages
    assert len([m for m in logged if m["type"] == "agent_judgement_final"]) == 1
    pending = await store.redis.xpending(store.keys.requests("sloth", APPID), WORKER_GROUP)
    assert pending["pending"] == 0


# -- the runner ------------------------------------------------------------------------------


async def test_burst_mode_returns_once_the_queue_is_empty(settings: Settings, store: Store) -> None:
    sessions = await queue_sessions(store, "echo", ["one", "two", "three"])
    worker = Worker([agents_for_tests.echo], settings, burst=True)
    await run_burst(worker)
    assert worker.processed == 3
    for session_id, text in zip(sessions, ["one", "two", "three"], strict=True):
        logged = await session_log(store, session_id)
        assert logged[-1]["type"] == "agent_judgement_complete"
        final = next(m for m in logged if m["type"] == "agent_judgement_final")
        assert final["data"]["judgement"] == f"echo: {text}"
    # Everything was acknowledged, nothing left pending for another worker.
    pending = await store.redis.xpending(store.keys.requests("echo", APP), WORKER_GROUP)
    assert pending["pending"] == 0


async def test_burst_mode_with_an_empty_queue_returns(settings: Settings) -> None:
    worker = Worker([agents_for_tests.echo], settings, burst=True)
    await run_burst(worker)
    assert worker.processed == 0


async def test_expired_request_is_acknowledged_without_running_the_agent(
    settings: Settings, store: Store
) -> None:
    calls = 0

    @agent("never")
    async def never(user_input: str, ctx: Context) -> str:
        nonlocal calls
        calls += 1
        return "ran"

    (session_id,) = await queue_sessions(store, "never", ["x"], timeout_ms=-1000)
    worker = Worker([never], settings, burst=True)
    await run_burst(worker)
    assert calls == 0
    assert [m["type"] for m in await session_log(store, session_id)] == ["agent_judgement_accepted"]
    pending = await store.redis.xpending(store.keys.requests("never", APP), WORKER_GROUP)
    assert pending["pending"] == 0


async def test_concurrency_limit_is_respected(settings: Settings, store: Store) -> None:
    running = 0
    peak = 0
    calls = 0

    @agent("counted")
    async def counted(user_input: str, ctx: Context) -> Judgement:
        nonlocal running, peak, calls
        calls += 1
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.1)
        finally:
            running -= 1
        return Judgement("ok", decision="approve")

    sessions = await queue_sessions(store, "counted", [str(i) for i in range(6)])
    worker = Worker([counted], settings, burst=True, concurrency=2)
    await run_burst(worker)
    assert calls == 6
    assert peak == 2
    for session_id in sessions:
        assert (await session_log(store, session_id))[-1]["type"] == "agent_judgement_complete"


async def test_concurrent_chunks_share_round_trips_and_keep_their_order(
    settings: Settings, store: Store
) -> None:
    @agent("chatty")
    async def chatty(user_input: str, ctx: Context) -> Judgement:
        for i in range(20):
            await ctx.think(f"{user_input}-{i}")
        return Judgement("done", decision="approve")

    sessions = await queue_sessions(store, "chatty", [f"s{i}" for i in range(8)])
    worker = Worker([chatty], settings, burst=True, concurrency=8)
    await run_burst(worker)
    for index, session_id in enumerate(sessions):
        logged = await session_log(store, session_id)
        thoughts = [m["data"]["thinking"] for m in logged if m["type"] == "agent_judgement_stream"]
        assert thoughts == [f"s{index}-{i}" for i in range(20)]
        assert [m["seq"] for m in logged] == list(range(1, len(logged) + 1))
    # Eight agents streaming at once, at most four round trips in flight: chunks shared some.
    assert worker.appender.chunks == 160
    assert worker.appender.round_trips < 160


async def test_chunk_appender_reports_refused_and_failed_appends(settings: Settings, store: Store) -> None:
    (session_id,) = await queue_sessions(store, "solo", ["x"])
    appender = ChunkAppender(store)
    first, unknown = await asyncio.gather(
        appender.append(session_id, "solo", {"thinking": "a"}),
        appender.append(new_session_id(), "solo", {"thinking": "b"}),
    )
    assert first.seq == 2
    assert unknown.seq is None  # a session that does not exist refuses the chunk
    assert appender.round_trips == 1  # both were queued before the first round trip left
    # Queued together, eight chunks of one session go in one round trip, in order.
    results = await asyncio.gather(
        *(appender.append(session_id, "solo", {"thinking": str(i)}) for i in range(8))
    )
    assert [r.seq for r in results] == list(range(3, 11))
    assert appender.round_trips == 2
    # A chunk that cannot be encoded fails its own agent only, not the batch it would join.
    bad, good = await asyncio.gather(
        appender.append(session_id, "solo", {"thinking": object()}),
        appender.append(session_id, "solo", {"thinking": "fine"}),
        return_exceptions=True,
    )
    assert isinstance(bad, TypeError)
    assert not isinstance(good, BaseException)
    assert good.seq == 11
    broken = ChunkAppender(Store(Redis.from_url("redis://127.0.0.1:1"), store.keys))
    with pytest.raises(BackendUnavailable):
        await broken.append(session_id, "solo", {"thinking": "c"})
    await broken.store.redis.aclose()
    await appender.aclose()


async def test_two_workers_share_an_agents_requests(settings: Settings, store: Store) -> None:
    calls: Counter[str] = Counter()

    class Shared(Agent):
        name = "shared"

        async def judge(self, user_input: str, ctx: Context) -> Judgement:
            calls[ctx.session_id] += 1
            await asyncio.sleep(0.05)
            return Judgement("done", decision="approve")

    sessions = await queue_sessions(store, "shared", [str(i) for i in range(12)])
    first = Worker([Shared()], settings, burst=True, concurrency=1)
    second = Worker([Shared()], settings, burst=True, concurrency=1)
    await asyncio.wait_for(asyncio.gather(first.run(), second.run()), 30)
    assert calls == Counter(dict.fromkeys(sessions, 1))  # each request processed exactly once
    assert first.processed + second.processed == 12
    assert first.processed > 0
    assert second.processed > 0
    for session_id in sessions:
        logged = await session_log(store, session_id)
        assert len([m for m in logged if m["type"] == "agent_judgement_final"]) == 1


async def test_stop_lets_an_in_flight_agent_finish_within_grace(settings: Settings, store: Store) -> None:
    started = asyncio.Event()

    @agent("steady")
    async def steady(user_input: str, ctx: Context) -> Judgement:
        started.set()
        await asyncio.sleep(0.3)
        return Judgement("finished anyway", decision="approve")

    (session_id,) = await queue_sessions(store, "steady", ["x"])
    worker = Worker([steady], settings, grace_s=10)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 15)
    logged = await session_log(store, session_id)
    final = next(m for m in logged if m["type"] == "agent_judgement_final")
    assert final["result_code"] == 0
    assert final["data"]["judgement"] == "finished anyway"
    pending = await store.redis.xpending(store.keys.requests("steady", APP), WORKER_GROUP)
    assert pending["pending"] == 0
    assert await store.liveness.live_worker_counts(["steady"]) == {"steady": 0}


async def test_stop_past_grace_leaves_the_request_for_another_worker(
    settings: Settings, store: Store
) -> None:
    started = asyncio.Event()

    @agent("stubborn")
    async def stubborn(user_input: str, ctx: Context) -> Judgement:
        started.set()
        await asyncio.sleep(60)
        return Judgement("never")

    (session_id,) = await queue_sessions(store, "stubborn", ["x"])
    worker = Worker([stubborn], settings, grace_s=0.1)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 15)
    assert [m["type"] for m in await session_log(store, session_id)] == ["agent_judgement_accepted"]
    pending = await store.redis.xpending(store.keys.requests("stubborn", APP), WORKER_GROUP)
    assert pending["pending"] == 1  # not acknowledged: it can be taken over


async def test_stop_with_every_slot_busy_still_honours_grace(settings: Settings, store: Store) -> None:
    started = asyncio.Event()

    @agent("hog")
    async def hog(user_input: str, ctx: Context) -> Judgement:
        started.set()
        await asyncio.sleep(30)
        return Judgement("never")

    await queue_sessions(store, "hog", ["x"])
    worker = Worker([hog], settings, grace_s=0.1, concurrency=1)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    # grace 0.1 s plus at most one blocking read (1 s); far less than the agent's 30 s.
    await asyncio.wait_for(task, 3)


class Lifecycle(Agent):
    """Records its hooks and judgements in a shared list, in order."""

    def __init__(self, name: str, events: list[str], *, fail_setup: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail_setup = fail_setup

    async def setup(self) -> None:
        self.events.append(f"{self.name} setup")
        if self.fail_setup:
            raise RuntimeError("no model today")

    async def close(self) -> None:
        self.events.append(f"{self.name} close")

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        self.events.append(f"{self.name} judge")
        await asyncio.sleep(0.2)
        self.events.append(f"{self.name} judged")
        return Judgement("done")


async def test_setup_runs_before_requests_and_close_after_draining(settings: Settings, store: Store) -> None:
    events: list[str] = []
    await queue_sessions(store, "first", ["x"])
    worker = Worker([Lifecycle("first", events), Lifecycle("second", events)], settings, grace_s=10)
    task = asyncio.create_task(worker.run())
    while "first judge" not in events:
        assert not task.done()
        await asyncio.sleep(0.01)
    worker.stop()  # while the judgement runs: it is drained before the agents close
    await asyncio.wait_for(task, 15)
    assert events == [
        "first setup",
        "second setup",
        "first judge",
        "first judged",
        "first close",
        "second close",
    ]


async def test_close_runs_when_a_setup_fails(settings: Settings, store: Store) -> None:
    events: list[str] = []
    agents = [
        Lifecycle("first", events),
        Lifecycle("second", events, fail_setup=True),
        Lifecycle("third", events),
    ]
    worker = Worker(agents, settings, burst=True)
    with pytest.raises(RuntimeError, match="no model today"):
        await run_burst(worker)
    # Only agents whose setup returned are closed; nothing was read.
    assert events == ["first setup", "second setup", "first close"]
    assert worker.processed == 0
    assert await store.liveness.live_worker_counts(["first", "second", "third"]) == {
        "first": 0,
        "second": 0,
        "third": 0,
    }


def test_worker_needs_an_agent(settings: Settings) -> None:
    with pytest.raises(ValueError, match="agent"):
        Worker([], settings)


def test_agent_names_are_validated() -> None:
    with pytest.raises(ValueError, match="invalid agent name"):

        @agent("no spaces allowed")
        async def bad(user_input: str, ctx: Context) -> str:
            return ""


# -- loading agents the way `magi-gateway agent` does ------------------------------------------


def test_load_agents_builtin_specs() -> None:
    demo = load_agents(["demo"], chunks=3, chunk_bytes=10, delay_s=0)
    assert [a.name for a in demo] == ["melchior", "balthasar", "casper"]
    assert all(isinstance(a, DemoAgent) for a in demo)
    (melchior,) = load_agents(["melchior"], chunks=3, chunk_bytes=10, delay_s=0)
    assert melchior.name == "melchior"
    (bench,) = load_agents(["bench"], chunks=3, chunk_bytes=10, delay_s=0)
    assert isinstance(bench, BenchAgent)
    assert bench.name == "bench"
    assert bench.chunks == 3
    assert bench.payload == "x" * 10


def test_load_agents_module_object_specs() -> None:
    (echo,) = load_agents(["tests.agents_for_tests:echo"], chunks=1, chunk_bytes=1, delay_s=0)
    assert isinstance(echo, FunctionAgent)
    assert echo.name == "echo"
    (klass,) = load_agents(["tests.agents_for_tests:KlassAgent"], chunks=1, chunk_bytes=1, delay_s=0)
    assert isinstance(klass, agents_for_tests.KlassAgent)  # a class is instantiated
    several = load_agents(["tests.agents_for_tests:AGENTS", "casper"], chunks=1, chunk_bytes=1, delay_s=0)
    assert [a.name for a in several] == ["echo", "klass", "casper"]


@pytest.mark.parametrize("spec", ["nonsense", "tests.agents_for_tests:NOT_AN_AGENT"])
def test_load_agents_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(typer.BadParameter):
        load_agents([spec], chunks=1, chunk_bytes=1, delay_s=0)


async def test_agent_command_serves_a_module_object(settings: Settings, redis_url: str, store: Store) -> None:
    """``python -m magi_gateway agent tests.agents_for_tests:echo --burst`` as a real process."""
    sessions = await queue_sessions(store, "echo", ["from a subprocess"])
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "magi_gateway",
        "agent",
        "tests.agents_for_tests:echo",
        "--burst",
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    logged = await session_log(store, sessions[0])
    final = next(m for m in logged if m["type"] == "agent_judgement_final")
    assert final["data"]["judgement"] == "echo: from a subprocess"
    assert logged[-1]["type"] == "agent_judgement_complete"
