"""Fault injection with real processes (DESIGN §3, issue 3).

Each test kills or signals a real process — a worker, the Redis server, a gateway —
while a session streams, and checks what the client sees: seqs 1..n exactly once, one
final per agent, one complete, last. Workers run ``python -m magi_gateway agent bench``
(a slow synthetic agent), gateways run in-process or as ``serve`` subprocesses.

Timing knobs used throughout: workers heartbeat (and so refresh their running requests)
every 0.2 s and a request idle for 1 s is taken over (``WORKER_CLAIM_IDLE_S=1``), so a
live worker never loses its request and a dead worker's request moves within ~1.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import websockets
from redis.asyncio import Redis

from magi_gateway.client import MagiClient
from magi_gateway.core.ids import AgentId
from magi_gateway.embedded import RedisServer
from magi_gateway.redis.keys import WORKER_GROUP, Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings

from ._support import (
    APPID,
    SECRET,
    GatewayHandle,
    SessionRecord,
    assert_well_formed,
    judgement_message,
    recv,
    send,
    spawn_gateway,
    spawn_process,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]

AGENT = AgentId("bench")
#: The slow bench agent: CHUNKS chunks, DELAY_S apart (about 2 s per attempt).
CHUNKS = 40
DELAY_S = 0.05


# -- processes ----------------------------------------------------------------------------------


class Proc:
    """A ``python -m magi_gateway`` subprocess whose output a thread collects, timestamped."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @classmethod
    def spawn(cls, args: list[str], env: dict[str, str]) -> Proc:
        return cls(spawn_process(args, env))

    def _drain(self) -> None:
        stream = self.process.stdout
        if stream is None:
            return
        with contextlib.suppress(ValueError, OSError):
            for raw in stream:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return "\n".join(line for _t, line in self.lines)

    def lines_between(self, start: float, end: float) -> list[str]:
        return [line for t, line in self.lines if start <= t <= end]

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM, SIGKILL if it lingers; then collect the rest of the output."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


async def stop_all(procs: list[Proc]) -> None:
    for proc in procs:
        await asyncio.to_thread(proc.stop)


def process_env(redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """Environment of gateway and worker subprocesses."""
    return {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "FIXED_SECRET": SECRET,
        "WORKER_HEARTBEAT_INTERVAL_S": "0.2",
        "WORKER_TTL_S": "3",
        "WORKER_CLAIM_IDLE_S": "1",
        "REDIS_BACKOFF_CAP_S": "1",
        "JUDGEMENT_TIMEOUT_S": "30",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def bench_worker(env: dict[str, str], chunks: int = CHUNKS, delay_s: float = DELAY_S) -> Proc:
    return Proc.spawn(["agent", AGENT, "--chunks", str(chunks), "--delay", str(delay_s)], env)


async def start_gateway_process(env: dict[str, str]) -> tuple[Proc, GatewayHandle]:
    handle = await asyncio.to_thread(spawn_gateway, env)
    assert handle.process is not None
    return Proc(handle.process), handle


def ws_base(handle: GatewayHandle) -> str:
    return f"ws://127.0.0.1:{handle.port}/ws"


async def wait_live_workers(redis: Redis, key_prefix: str, count: int, procs: list[Proc]) -> None:
    """Until ``count`` workers of the bench agent heartbeat."""
    store = Store(redis, Keys(key_prefix))
    for _ in range(300):
        if (await store.liveness.live_worker_counts([AGENT]))[AGENT] >= count:
            return
        for proc in procs:
            assert proc.process.poll() is None, f"worker exited:\n{proc.output}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} bench workers never became live")


async def consumers(redis: Redis, key_prefix: str) -> list[str]:
    """Consumer names of the bench agent's live workers (a worker's id is its consumer name;
    it joins the group of an appid's stream on its first read there)."""
    return [name.decode() for name in await redis.zrange(Keys(key_prefix).workers(AGENT), 0, -1)]


async def wait_new_consumer(redis: Redis, key_prefix: str, known: list[str], proc: Proc) -> str:
    """The consumer name of the worker started after ``known`` joined."""
    for _ in range(300):
        new = [name for name in await consumers(redis, key_prefix) if name not in known]
        if new:
            assert len(new) == 1, new
            return new[0]
        assert proc.process.poll() is None, f"worker exited:\n{proc.output}"
        await asyncio.sleep(0.05)
    raise AssertionError("the worker never joined the consumer group")


async def serving_consumer(redis: Redis, key_prefix: str) -> str:
    """The consumer holding the (single) bench request."""
    pending: Any = await redis.xpending_range(
        Keys(key_prefix).requests(AGENT, APPID), WORKER_GROUP, min="-", max="+", count=10
    )
    assert len(pending) == 1, pending
    return str(pending[0]["consumer"].decode())


async def wait_nothing_pending(redis: Redis, key_prefix: str, timeout: float = 5) -> None:
    """Until the bench agent's request stream has no unacknowledged request."""
    async with asyncio.timeout(timeout):
        while True:
            pending: Any = await redis.xpending(Keys(key_prefix).requests(AGENT, APPID), WORKER_GROUP)
            if pending["pending"] == 0:
                return
            await asyncio.sleep(0.05)


# -- sessions -----------------------------------------------------------------------------------


def chunks(record: SessionRecord) -> list[dict[str, Any]]:
    return record.of_type("agent_judgement_stream")


async def read_until(
    ws: websockets.ClientConnection,
    record: SessionRecord,
    done: Callable[[SessionRecord], bool],
    timeout: float = 20,
) -> None:
    """Append the session's messages to ``record`` until ``done(record)``."""
    async with asyncio.timeout(timeout):
        while not done(record):
            message = await recv(ws, timeout)
            assert "error" not in message, message
            record.messages.append(message)


def completed(record: SessionRecord) -> bool:
    return bool(record.messages) and record.messages[-1]["type"] == "agent_judgement_complete"


def streamed(count: int) -> Callable[[SessionRecord], bool]:
    return lambda record: len(chunks(record)) >= count


class Collector:
    """Reads one connection in the background, grouping messages (and receipt times) by session."""

    def __init__(self, ws: websockets.ClientConnection, sessions: int) -> None:
        self.ws = ws
        self.sessions = sessions
        self.records: dict[str, SessionRecord] = {}
        self.times: dict[str, list[float]] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        done = 0
        while done < self.sessions:
            message = orjson.loads(await self.ws.recv())
            assert "error" not in message, message
            self.records.setdefault(message["session_id"], SessionRecord()).messages.append(message)
            self.times.setdefault(message["session_id"], []).append(time.monotonic())
            if message["type"] == "agent_judgement_complete":
                done += 1

    def min_chunks(self) -> int:
        if len(self.records) < self.sessions:
            return 0
        return min(len(chunks(r)) for r in self.records.values())

    async def wait_chunks(self, count: int, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while self.min_chunks() < count:
                if self.task.done():
                    self.task.result()
                    raise AssertionError("sessions completed too early")
                await asyncio.sleep(0.01)

    async def finish(self, timeout: float = 30) -> dict[str, SessionRecord]:
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return self.records

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def assert_attempt_chunks(record: SessionRecord, attempt: int) -> None:
    """Every chunk belongs to the first attempt or to ``attempt``, in that order."""
    attempts = [m["data"].get("attempt", 1) for m in chunks(record)]
    assert set(attempts) <= {1, attempt}, attempts
    assert attempts == sorted(attempts), attempts


# -- 1, 2: a worker killed mid-stream -------------------------------------------------------------


async def kill_serving_worker(
    redis: Redis,
    key_prefix: str,
    gateway: GatewayHandle,
    env: dict[str, str],
    procs: list[Proc],
) -> tuple[SessionRecord, Proc, Proc, int]:
    """Two bench workers, one judgement, SIGKILL the worker serving it after 3 chunks.

    Returns the session (to its complete), the killed and the surviving worker, and how
    many chunks the client had when the kill happened.
    """
    first = bench_worker(env)
    procs.append(first)
    first_name = await wait_new_consumer(redis, key_prefix, [], first)
    second = bench_worker(env)
    procs.append(second)
    second_name = await wait_new_consumer(redis, key_prefix, [first_name], second)
    await wait_live_workers(redis, key_prefix, 2, procs)
    by_name = {first_name: first, second_name: second}

    record = SessionRecord()
    async with await gateway.connect() as ws:
        await send(ws, judgement_message([AGENT]))
        await read_until(ws, record, streamed(3))
        victim = by_name[await serving_consumer(redis, key_prefix)]
        survivor = second if victim is first else first
        await asyncio.to_thread(victim.kill)
        chunks_at_kill = len(chunks(record))
        await read_until(ws, record, completed, timeout=25)
    assert victim.process.returncode == -signal.SIGKILL
    assert survivor.process.poll() is None, survivor.output
    return record, victim, survivor, chunks_at_kill


async def test_killed_worker_request_is_taken_over_and_rerun(
    settings: Settings, key_prefix: str, redis_url: str, redis_client: Redis, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings)
    procs: list[Proc] = []
    try:
        record, _victim, survivor, chunks_at_kill = await kill_serving_worker(
            redis_client, key_prefix, gateway, process_env(redis_url, key_prefix), procs
        )
        assert_well_formed(record, [AGENT])
        final = record.finals[AGENT]
        assert final["result_code"] == 0, final
        assert final["data"]["decision"] == "approve"
        assert record.complete["data"]["results"] == {AGENT: {"result_code": 0, "decision": "approve"}}
        # The first attempt streamed some chunks and died; the second streamed all of them.
        assert_attempt_chunks(record, 2)
        first_attempt = [m for m in chunks(record) if "attempt" not in m["data"]]
        second_attempt = [m for m in chunks(record) if m["data"].get("attempt") == 2]
        assert chunks_at_kill <= len(first_attempt) < CHUNKS
        assert len(second_attempt) == CHUNKS
        assert "taking over request" in survivor.output
        # Acknowledged (just after the final): nothing is left for anyone to run again.
        await wait_nothing_pending(redis_client, key_prefix)
    finally:
        await stop_all(procs)


async def test_killed_worker_past_delivery_limit_gives_result_code_5(
    settings: Settings, key_prefix: str, redis_url: str, redis_client: Redis, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings)
    procs: list[Proc] = []
    env = process_env(redis_url, key_prefix, WORKER_MAX_DELIVERIES="1")
    try:
        record, _victim, survivor, chunks_at_kill = await kill_serving_worker(
            redis_client, key_prefix, gateway, env, procs
        )
        assert_well_formed(record, [AGENT])
        final = record.finals[AGENT]
        assert final["result_code"] == 5, final
        assert isinstance(final["data"]["error"], str)
        assert final["data"]["error"]
        assert record.complete["data"]["results"] == {AGENT: {"result_code": 5}}
        # No second attempt ran: only the dead worker's chunks precede the final.
        assert all("attempt" not in m["data"] for m in chunks(record))
        assert chunks_at_kill <= len(chunks(record)) < CHUNKS
        assert "taking over request" in survivor.output
        await wait_nothing_pending(redis_client, key_prefix)
    finally:
        await stop_all(procs)


# -- 3: Redis killed and restarted ----------------------------------------------------------------


def _outage_lines(lines: list[str]) -> list[str]:
    """Log lines other than uvicorn's access log (the test's own /readyz polls)."""
    return [line for line in lines if '"GET /' not in line]


async def test_redis_kill_and_restart_sessions_complete_and_readyz_tracks_it(
    tmp_path: Path, key_prefix: str
) -> None:
    server = RedisServer(
        tmp_path / "redis",
        persistence=True,
        fsync="always",
        # RedisServer.start ignores ``fsync`` (it always passes everysec); a later
        # command-line option wins, so this makes the crash lossless either way.
        extra_args=("--appendfsync", "always"),
    )
    server.start()
    procs: list[Proc] = []
    redis = Redis.from_url(server.url)
    try:
        assert (await redis.config_get("appendfsync"))["appendfsync"] == "always"
        env = process_env(server.url, key_prefix)
        # About 3 s of streaming per session, so the outage lands mid-stream.
        worker = bench_worker(env, chunks=60)
        procs.append(worker)
        gateway_proc, gateway = await start_gateway_process(env)
        procs.append(gateway_proc)
        await wait_live_workers(redis, key_prefix, 1, procs)

        async with httpx.AsyncClient(base_url=gateway.http, timeout=5) as http:
            assert (await http.get("/readyz")).status_code == 200
            async with await gateway.connect() as ws:
                collector = Collector(ws, sessions=2)
                try:
                    for question in ("Shall we have tea?", "Deploy the untested weapon?"):
                        await send(ws, judgement_message([AGENT], question))
                    await collector.wait_chunks(3)

                    killed_at = time.monotonic()
                    await asyncio.to_thread(server.kill)
                    statuses: list[int] = []
                    async with asyncio.timeout(10):
                        while not statuses or statuses[-1] != 503:
                            statuses.append((await http.get("/readyz")).status_code)
                            await asyncio.sleep(0.05)
                    # Not ready for as long as Redis stays down.
                    down_until = time.monotonic() + 2.5
                    while time.monotonic() < down_until:
                        assert (await http.get("/readyz")).status_code == 503
                        await asyncio.sleep(0.1)
                    chunks_during_outage = collector.min_chunks()

                    await asyncio.to_thread(server.restart)
                    async with asyncio.timeout(15):
                        while (await http.get("/readyz")).status_code != 200:
                            await asyncio.sleep(0.1)
                    ready_at = time.monotonic()
                    records = await collector.finish(timeout=30)
                finally:
                    await collector.cancel()

        assert len(records) == 2
        for record in records.values():
            assert_well_formed(record, [AGENT])
            assert record.finals[AGENT]["result_code"] == 0, record.finals[AGENT]
            assert record.complete["data"]["verdict"] == "approve"
            # No chunk lost (one whose reply was lost in the outage may appear twice),
            # and the only worker kept its request: no second attempt.
            assert len(chunks(record)) >= 60
            assert all("attempt" not in m["data"] for m in chunks(record))
        assert chunks_during_outage < 60, "sessions finished before the outage"
        assert gateway_proc.process.poll() is None
        assert worker.process.poll() is None

        # Reconnects back off: a handful of lines per process for the outage, not one per try.
        for proc, name in ((gateway_proc, "gateway"), (worker, "worker")):
            noise = _outage_lines(proc.lines_between(killed_at, ready_at))
            assert len(noise) < 30, f"{name} logged {len(noise)} lines in the outage:\n" + "\n".join(noise)
            assert "Traceback" not in proc.output, proc.output
    finally:
        await redis.aclose()
        await stop_all(procs)
        await asyncio.to_thread(server.stop)


# -- 4: a gateway killed mid-stream ---------------------------------------------------------------


async def test_gateway_kill_client_resumes_on_the_other_instance(
    key_prefix: str, redis_url: str, redis_client: Redis
) -> None:
    env = process_env(redis_url, key_prefix)
    procs: list[Proc] = []
    try:
        worker = bench_worker(env)
        procs.append(worker)
        started = await asyncio.gather(start_gateway_process(env), start_gateway_process(env))
        procs.extend(proc for proc, _handle in started)
        (proc_a, gateway_a), (_proc_b, gateway_b) = started
        await wait_live_workers(redis_client, key_prefix, 1, procs)

        messages: list[dict[str, Any]] = []
        async with MagiClient(
            [ws_base(gateway_a), ws_base(gateway_b)],
            appid=APPID,
            secret=SECRET,
            backoff_base_s=0.05,
            backoff_cap_s=0.5,
        ) as client:
            assert client.url == ws_base(gateway_a)
            judgement = cast(AsyncGenerator[dict[str, Any], None], client.judge("Tea?", [AGENT]))
            async with asyncio.timeout(30), contextlib.aclosing(judgement) as stream:
                async for message in stream:
                    messages.append(message)
                    if len(chunks(SessionRecord(messages))) == 3 and proc_a.process.poll() is None:
                        await asyncio.to_thread(proc_a.kill)
            assert client.reconnects >= 1
            assert client.url == ws_base(gateway_b)

        assert proc_a.process.returncode == -signal.SIGKILL
        record = SessionRecord(messages)
        assert_well_formed(record, [AGENT])  # every seq 1..n exactly once, in order
        assert record.finals[AGENT]["result_code"] == 0
        assert len(chunks(record)) == CHUNKS
        assert all("attempt" not in m["data"] for m in chunks(record))
    finally:
        await stop_all(procs)


# -- 5: a gateway stopped with SIGTERM --------------------------------------------------------------


async def test_gateway_sigterm_closes_1012_and_session_resumes_elsewhere(
    key_prefix: str, redis_url: str, redis_client: Redis
) -> None:
    env = process_env(redis_url, key_prefix)
    procs: list[Proc] = []
    try:
        worker = bench_worker(env)
        procs.append(worker)
        started = await asyncio.gather(start_gateway_process(env), start_gateway_process(env))
        procs.extend(proc for proc, _handle in started)
        (proc_a, gateway_a), (_proc_b, gateway_b) = started
        await wait_live_workers(redis_client, key_prefix, 1, procs)

        record = SessionRecord()
        async with await gateway_a.connect() as ws:
            await send(ws, judgement_message([AGENT]))
            await read_until(ws, record, streamed(3))
            proc_a.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await read_until(ws, record, completed, timeout=10)
        assert closed.value.rcvd is not None, "closed without a close frame"
        assert closed.value.rcvd.code == 1012
        # It exits promptly after a clean shutdown (its Redis connections closed).
        returncode = await asyncio.to_thread(proc_a.process.wait, 5)
        assert returncode in (0, -signal.SIGTERM), proc_a.output
        await asyncio.to_thread(proc_a.stop)
        assert "Application shutdown complete" in proc_a.output
        assert re.search(r"gateway instance \w+ stopped", proc_a.output), proc_a.output
        assert "Traceback" not in proc_a.output

        session_id = record.messages[0]["session_id"]
        assert record.seqs == list(range(1, len(record.messages) + 1))
        assert not completed(record), "the session finished before the restart"
        async with await gateway_b.connect() as ws:
            await send(ws, {"type": "resume", "session_id": session_id, "last_seq": record.seqs[-1]})
            await read_until(ws, record, completed, timeout=20)
        assert_well_formed(record, [AGENT])
        assert record.finals[AGENT]["result_code"] == 0
        assert len(chunks(record)) == CHUNKS  # nothing lost, nothing run twice
        assert all("attempt" not in m["data"] for m in chunks(record))
    finally:
        await stop_all(procs)


async def test_gateway_sigterm_exit_status_is_zero(key_prefix: str, redis_url: str) -> None:
    proc, _gateway = await start_gateway_process(process_env(redis_url, key_prefix))
    try:
        proc.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.process.wait, 5)
        assert returncode == 0, proc.output
    finally:
        await asyncio.to_thread(proc.stop)


# -- 6: a worker stopped with SIGTERM -------------------------------------------------------------


async def test_worker_sigterm_finishes_the_in_flight_request_then_exits(
    settings: Settings, key_prefix: str, redis_url: str, redis_client: Redis, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings)
    procs: list[Proc] = []
    try:
        worker = bench_worker(process_env(redis_url, key_prefix))
        procs.append(worker)
        await wait_live_workers(redis_client, key_prefix, 1, procs)

        record = SessionRecord()
        async with await gateway.connect() as ws:
            await send(ws, judgement_message([AGENT]))
            await read_until(ws, record, streamed(3))
            worker.process.send_signal(signal.SIGTERM)
            await read_until(ws, record, completed, timeout=15)
        returncode = await asyncio.to_thread(worker.process.wait, 10)
        assert returncode == 0, worker.output

        assert_well_formed(record, [AGENT])
        assert record.finals[AGENT]["result_code"] == 0
        assert len(chunks(record)) == CHUNKS  # the same attempt ran to the end
        assert all("attempt" not in m["data"] for m in chunks(record))
        store = Store(redis_client, Keys(key_prefix))
        assert await store.liveness.live_worker_counts([AGENT]) == {AGENT: 0}  # it left the live set
        await wait_nothing_pending(redis_client, key_prefix)
    finally:
        await stop_all(procs)
