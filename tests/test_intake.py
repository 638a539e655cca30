"""A failure between creating a session and queueing its requests (#12 item 9).

The fault is real: the Redis server is killed (SIGKILL) right after the gateway created
the session, so queueing its requests fails; Redis is restarted and the session must
still be served by its agent (``result_code`` 0), not left to time out (code 2).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from magi_gateway.embedded import RedisServer
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from . import agents_for_tests
from ._support import SECRET, GatewayHandle, SessionRecord, assert_well_formed, judgement_message, recv, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]


class KillsRedisAfterCreate(Store):
    """The gateway's store, with the Redis server killed right after a session is created."""

    def __init__(self, store: Store, server: RedisServer) -> None:
        super().__init__(
            store.redis,
            store.keys,
            retention_s=store.retention_ms // 1000,
            request_stream_maxlen=store.request_stream_maxlen,
        )
        self.server = server
        self.killed = asyncio.Event()

    async def create_session(self, *args: Any, **kwargs: Any) -> None:
        await super().create_session(*args, **kwargs)
        if not self.killed.is_set():
            await asyncio.to_thread(self.server.kill)
            self.killed.set()


@pytest.fixture
def crashing_redis(tmp_path: Path) -> Any:
    # appendfsync always: the crash right after the session's creation loses none of it.
    server = RedisServer(tmp_path / "redis", persistence=True, fsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_requests_are_queued_after_a_failure_between_session_and_queue(
    crashing_redis: RedisServer, key_prefix: str, start_gateway: StartGateway
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=crashing_redis.url,
        redis_key_prefix=key_prefix,
        fixed_secret=SECRET,
        judgement_timeout_s=20,
        worker_heartbeat_interval_s=0.2,
        worker_ttl_s=30,
        redis_backoff_cap_s=0.5,
    )
    worker = Worker([agents_for_tests.echo], settings)
    worker_task = asyncio.create_task(worker.run())
    try:
        for _ in range(200):
            if (await worker.store.liveness.live_worker_counts(["echo"]))["echo"]:
                break
            await asyncio.sleep(0.02)
        handle = await start_gateway(settings)
        assert handle.gateway is not None
        faulty = KillsRedisAfterCreate(handle.gateway.store, crashing_redis)
        handle.gateway.sessions.store = faulty
        async with await handle.connect() as ws:
            await send(ws, judgement_message(["echo"]))
            record = SessionRecord()
            record.messages.append(await recv(ws))
            assert record.messages[0]["type"] == "agent_judgement_accepted"
            await asyncio.wait_for(faulty.killed.wait(), 10)
            # Redis comes back only once the gateway has given up on the judgement's frame.
            while any(t.get_name().startswith("frame-") for t in handle.gateway._tasks):
                await asyncio.sleep(0.05)
            await asyncio.to_thread(crashing_redis.restart)
            while record.messages[-1]["type"] != "agent_judgement_complete":
                message = await recv(ws, timeout=30)
                if "error" in message:
                    continue  # the enqueue's backend_unavailable, if any
                record.messages.append(message)
        assert_well_formed(record, ["echo"])
        assert record.finals["echo"]["result_code"] == 0, record.finals["echo"]
    finally:
        worker.stop()
        await asyncio.gather(worker_task, return_exceptions=True)
