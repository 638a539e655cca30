"""Outbound memory is bounded in bytes, and a repeated ``resume`` replaces the earlier one
(issue #12 item 1), against a real in-process gateway, real workers and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import websockets
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from magi_gateway.agents import BenchAgent
from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.outbox import Connection
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import (
    Gated,
    assert_nothing_more,
    collect_until_complete,
    eventually,
    logged,
    read_until_closed,
    record_of,
    stalled_connection,
    wait_logged_complete,
)
from ._support import GatewayHandle, assert_well_formed, judge, judgement_message, recv, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]

#: A session of about 8 MB (more than the kernel's socket buffers absorb), in chunks well
#: under any chunk size limit.
CHUNKS = 500
CHUNK_BYTES = 16_000
MAX_BYTES = 1024 * 1024
RESUMES = 20


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix), retention_s=settings.session_retention_s)


@pytest.fixture
async def byte_bounded(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> tuple[GatewayHandle, Gateway]:
    """A gateway bounded by bytes, not frames, and a worker writing a session of ~8 MB."""
    limited = settings.model_copy(update={"max_outbound_messages": 100_000, "max_outbound_bytes": MAX_BYTES})
    handle = await start_gateway(limited)
    assert handle.gateway is not None
    await start_worker([BenchAgent(chunks=CHUNKS, chunk_bytes=CHUNK_BYTES)], settings=limited)
    return handle, handle.gateway


def resume(session_id: str, last_seq: int) -> dict[str, Any]:
    return {"type": "resume", "session_id": session_id, "last_seq": last_seq}


def resumes_ok() -> float:
    return REGISTRY.get_sample_value("magi_resumes_total", {"outcome": "ok"}) or 0.0


def queued_bytes(connection: Connection) -> int:
    """What the connection's outbox holds, counted frame by frame."""
    return sum(len(frame) for frame in connection.outbox._frames)


def replays_running(gateway: Gateway, session_id: str) -> int:
    return sum(1 for t in gateway._tasks if t.get_name() == f"replay-{session_id}" and not t.done())


async def sample_until_settled(
    connection: Connection, resumes_done: float, settle_polls: int = 30
) -> list[int]:
    """The outbox's bytes every few ms, until the resumes were handled and the outbox has not
    changed for ``settle_polls`` polls since."""
    samples = [queued_bytes(connection)]
    unchanged = 0
    for _ in range(3000):  # at most ~15 s
        await asyncio.sleep(0.005)
        samples.append(queued_bytes(connection))
        if resumes_ok() < resumes_done:
            continue
        unchanged = unchanged + 1 if samples[-1] == samples[-2] else 0
        if unchanged >= settle_polls:
            return samples
    raise AssertionError("the resumes were not handled, or the outbox never settled")


async def test_a_client_that_never_reads_stays_bounded_through_many_resumes(
    byte_bounded: tuple[GatewayHandle, Gateway], store: Store
) -> None:
    handle, gateway = byte_bounded
    async with websockets.connect(handle.ws_url(), max_size=None) as ws:
        assert (await recv(ws))["type"] == "connection_established"
        session = await judge(ws, ["bench"], timeout=30)
    session_id = session.messages[0]["session_id"]
    log = await logged(store, session_id)
    assert len(log) == CHUNKS + 3
    largest = max(len(frame) for _seq, _kind, frame in await store.read_log(session_id, 1))

    ws = await stalled_connection(handle)
    async with ws:
        hello = await recv(ws)
        connection = gateway._connections[hello["connection_id"]]
        done = resumes_ok() + RESUMES
        for _ in range(RESUMES):
            await send(ws, resume(session_id, 0))
        samples = await sample_until_settled(connection, done)
        # The client reads nothing: the gateway holds at most its byte bound (plus one frame
        # that arrived into an empty buffer), and one replay of the session, not twenty.
        assert max(samples) <= MAX_BYTES + largest, max(samples)
        assert not connection.closing
        assert replays_running(gateway, session_id) <= 1
        # Reading again: the whole session once, in order, then nothing more.
        got = await collect_until_complete(ws, session_id, timeout=30)
        await assert_nothing_more(ws)
    assert got == log


async def test_live_output_past_the_byte_bound_closes_a_client_that_does_not_read_1013(
    byte_bounded: tuple[GatewayHandle, Gateway], store: Store
) -> None:
    handle, gateway = byte_bounded
    ws = await stalled_connection(handle)
    async with ws:
        connection = gateway._connections[(await recv(ws))["connection_id"]]
        await send(ws, judgement_message(["bench"]))
        session_id = (await recv(ws))["session_id"]
        await wait_logged_complete(store, session_id, timeout=30)
        # Far fewer frames than MAX_OUTBOUND_MESSAGES, but more bytes than MAX_OUTBOUND_BYTES.
        assert connection.outbox.close_reason is not None
        assert connection.outbox.close_reason[0] == CLOSE_TRY_AGAIN_LATER
        in_flight, code = await read_until_closed(ws, CHUNKS + 10)
    assert code == CLOSE_TRY_AGAIN_LATER
    assert 0 < len(in_flight) < CHUNKS  # cut short; the client resumes with nothing lost


async def test_a_client_resuming_twice_gets_each_message_once_in_order(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    handle = await start_gateway(settings)
    gated = Gated("gated", before=3, after=3)
    await start_worker([gated.agent])
    async with await handle.connect() as starter:
        await send(starter, {"type": "agent_judgement", "agent_ids": ["gated"], "data": {"user_input": "x"}})
        session_id = (await recv(starter))["session_id"]

    async def started() -> bool:
        return gated.invocations > 0

    await eventually(started, what="the agent started")
    async with await handle.connect() as ws:
        await send(ws, resume(session_id, 0))
        first = [await recv(ws) for _ in range(4)]  # accepted and the three chunks before the gate
        await send(ws, resume(session_id, 0))
        await send(ws, resume(session_id, 2))
        await assert_nothing_more(ws)  # neither resume queued anything again
        gated.gate.set()
        rest = await collect_until_complete(ws, session_id)
        await assert_nothing_more(ws)
    record = record_of(first + rest)
    assert_well_formed(record, ["gated"])
    assert record.messages == await logged(store, session_id)
