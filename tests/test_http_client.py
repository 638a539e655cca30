"""``MagiHttpClient`` and ``magi-gateway ask --http`` against live gateways, real Redis and workers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvicorn

from magi_gateway.agents import demo_agents
from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.core.errors import AuthenticationFailed
from magi_gateway.http_client import MagiHttpClient, http_base_url
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import APPID, SECRET, GatewayHandle, SessionRecord, assert_well_formed
from .test_http_api import DEMO, gated_agent

StartWorker = Callable[..., Awaitable[Worker]]


async def test_judge_streams_the_whole_session(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with MagiHttpClient(gateway.http, appid=APPID, secret=SECRET) as client:
        record = SessionRecord([m async for m in client.judge("Shall we have tea?", DEMO)])
        agents = await client.agents()
    assert_well_formed(record, DEMO)
    assert record.complete["data"]["verdict"] == "approve"
    assert sorted(a["agent_id"] for a in agents) == sorted(DEMO)
    assert client.reconnects == 0


async def test_bad_credentials_are_raised_not_retried(gateway: GatewayHandle) -> None:
    async with MagiHttpClient(gateway.http, appid=APPID, secret="wrong") as client:
        with pytest.raises(AuthenticationFailed):
            async for _message in client.judge("x", DEMO):
                pass
    assert client.reconnects == 0


class Servers:
    """Gateways on uvicorn servers a test may stop one by one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: dict[str, tuple[uvicorn.Server, asyncio.Task[None]]] = {}

    async def start(self) -> str:
        """Start one; its base URL."""
        server = uvicorn.Server(
            uvicorn_config(create_app(self.settings), self.settings, "127.0.0.1", 0, "warning")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        self.running[url] = (server, task)
        return url

    async def stop(self, url: str) -> None:
        """Shut one down (its streams end) and wait until it has."""
        server, task = self.running[url]
        server.should_exit = True
        await task


@pytest.fixture
async def servers(settings: Settings) -> AsyncIterator[Servers]:
    servers = Servers(settings)
    yield servers
    for server, _task in servers.running.values():
        server.should_exit = True
    await asyncio.gather(*(task for _server, task in servers.running.values()), return_exceptions=True)


async def test_a_stream_cut_by_a_gateway_restart_continues_on_the_next(
    servers: Servers, start_worker: StartWorker
) -> None:
    first, second = await servers.start(), await servers.start()
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    record = SessionRecord()
    async with MagiHttpClient([first, second], appid=APPID, secret=SECRET, backoff_base_s=0.01) as client:
        async for message in client.judge("Shall we?", ["gated"]):
            record.messages.append(message)
            if "before 2" in str(message.get("data", {}).get("thinking")):
                await servers.stop(first)  # the stream ends with it; the client moves on
                gate.set()
    assert client.reconnects >= 1
    assert_well_formed(record, ["gated"])
    assert [m["data"]["thinking"] for m in record.of_type("agent_judgement_stream")] == [
        *(f"gated before {i}" for i in range(3)),
        *(f"gated after {i}" for i in range(3)),
    ]


def test_http_base_urls() -> None:
    assert http_base_url("ws://h:1/ws") == "http://h:1"
    assert http_base_url("wss://h/ws") == "https://h"
    assert http_base_url("http://h:8000/") == "http://h:8000"


async def test_ask_over_http(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "magi_gateway",
        "ask",
        "--http",
        "--url",
        f"ws://127.0.0.1:{gateway.port}/ws",
        "--appid",
        APPID,
        "--secret",
        SECRET,
        "Shall we have tea?",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode()
    assert "VERDICT: APPROVE" in out.decode()
