"""``main:app`` without a lifespan: ``uvicorn main:app --lifespan off`` and a ``TestClient``
used without ``with`` start the gateway on the first request, once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its TestClient; httpx (what this project pins) works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from magi_gateway.agents.demo import demo_agents
from magi_gateway.embedded import free_port
from magi_gateway.server.lazy import LazyStartApp, lazy_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import APPID, SECRET, GatewayHandle, assert_well_formed, judge, make_token, stop_process

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["melchior", "balthasar", "casper"]


def test_main_app_is_the_lazily_started_app() -> None:
    env = {**os.environ, "FIXED_SECRET": SECRET}
    code = "import main, magi_gateway.server.lazy as lazy; print(isinstance(main.app, lazy.LazyStartApp))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.stdout.decode().strip() == "True", done.stderr.decode()


def test_test_client_without_with_starts_the_gateway(settings: Settings) -> None:
    app = lazy_app(settings)
    client = TestClient(app)  # no `with`: no lifespan; every request runs in a loop of its own
    assert client.get("/ws/health").json() == {"status": "healthy"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    url = f"/ws?appid={APPID}&token={make_token()}"
    with client.websocket_connect(url) as ws:
        assert orjson.loads(ws.receive_text())["type"] == "connection_established"
        ws.send_text('{"type": "ping"}')
        assert orjson.loads(ws.receive_text()) == {"type": "pong"}
        # Nobody serves this agent: answered at once with result_code 3, then the complete.
        ws.send_text(
            orjson.dumps(
                {"type": "agent_judgement", "agent_ids": ["nobody"], "data": {"user_input": "x"}}
            ).decode()
        )
        first = [orjson.loads(ws.receive_text()) for _ in range(3)]
    assert [m["type"] for m in first] == [
        "agent_judgement_accepted",
        "agent_judgement_final",
        "agent_judgement_complete",
    ]
    assert first[1]["result_code"] == 3
    # Another connection, another loop, another gateway instance: it resumes the session.
    with client.websocket_connect(url) as ws:
        assert orjson.loads(ws.receive_text())["type"] == "connection_established"
        ws.send_text(
            orjson.dumps({"type": "resume", "session_id": first[0]["session_id"], "last_seq": 1}).decode()
        )
        replayed = [orjson.loads(ws.receive_text()) for _ in range(2)]
    assert replayed == first[1:]


def test_test_client_with_with_uses_the_lifespan(settings: Settings) -> None:
    app = lazy_app(settings)
    with TestClient(app) as client:
        gateway = app.state.gateway
        assert gateway.accepting  # started by the lifespan
        assert client.get("/healthz").json()["instance"] == gateway.instance_id
        assert client.get("/readyz").status_code == 200
        assert app.state.gateway is gateway  # the same one serves every request
    assert not gateway.accepting  # and stopped by it


async def test_concurrent_first_requests_start_one_gateway(settings: Settings) -> None:
    app = lazy_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        answers = await asyncio.gather(*(client.get("/healthz") for _ in range(8)))
        instances = {answer.json()["instance"] for answer in answers}
        assert instances == {app.state.gateway.instance_id}
        assert (await client.get("/readyz")).status_code == 200
    task = app._task
    assert task is not None
    assert not task.done()
    task.cancel()  # what the loop's end does: the gateway stops
    await asyncio.gather(task, return_exceptions=True)
    assert not app.state.gateway.accepting
    assert isinstance(app, LazyStartApp)


async def test_uvicorn_lifespan_off_serves_judgements(
    settings: Settings, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await start_worker(demo_agents(delay_s=0.0))
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_dsn,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "FIXED_SECRET": SECRET,
    }
    args = ["-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    handle = GatewayHandle(port=port, process=process)
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                try:
                    # The first request starts the gateway; it answers once started.
                    answer = await client.get(f"{handle.http}/readyz", timeout=5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn never listened"
                    await asyncio.sleep(0.1)
            assert answer.status_code == 200, answer.text
        ws = await handle.connect()
        try:
            record = await judge(ws, DEMO)
        finally:
            await ws.close()
        assert_well_formed(record, DEMO)
    finally:
        stop_process(process)


@pytest.mark.parametrize("lifespan", [True, False])
def test_test_client_websocket_sessions_end_cleanly(settings: Settings, lifespan: bool) -> None:
    # The TestClient cancels the handler as soon as its client closed: the handler must
    # end within that cancel (else it escapes the client's cancel scope) and forget the
    # connection.
    app = lazy_app(settings)
    url = f"/ws?appid={APPID}&token={make_token()}"
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(TestClient(app)) if lifespan else TestClient(app)
        for _ in range(8):
            with client.websocket_connect(url) as ws:
                assert orjson.loads(ws.receive_text())["type"] == "connection_established"
                ws.send_text('{"type": "ping"}')
                assert orjson.loads(ws.receive_text()) == {"type": "pong"}
            assert app.state.gateway._connections == {}
