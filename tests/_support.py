"""Helpers shared by the tests: tokens, WebSocket sessions, gateway subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import orjson
import websockets
from starlette.applications import Starlette

from magi_gateway.embedded import free_port
from magi_gateway.server.gateway import Gateway
from magi_gateway.worker.runner import Worker

SECRET = "test-secret"
APPID = "test-app"


def make_token(appid: str = APPID, secret: str = SECRET, at: float | None = None) -> str:
    """A token computed exactly as the README's client example does."""
    minute = int((time.time() if at is None else at) // 60)
    return hashlib.sha256(f"{appid}{secret}{minute}".encode()).hexdigest()[:10]


@dataclass
class GatewayHandle:
    """A running gateway: in-process (``app``/``gateway`` set) or a subprocess."""

    port: int
    app: Starlette | None = None
    gateway: Gateway | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, appid: str = APPID, token: str | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?appid={appid}&token={token or make_token(appid)}"

    async def connect(self, appid: str = APPID) -> websockets.ClientConnection:
        """An authenticated connection, after its ``connection_established``."""
        ws = await websockets.connect(self.ws_url(appid))
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "connection_established"
        return ws


async def send(ws: websockets.ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message).decode())


async def recv(ws: websockets.ClientConnection, timeout: float = 10) -> dict[str, Any]:
    import asyncio

    result: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    return result


@dataclass
class SessionRecord:
    """Every message of one session, as a client received them."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def finals(self) -> dict[str, dict[str, Any]]:
        return {m["agent_id"]: m for m in self.of_type("agent_judgement_final")}

    @property
    def complete(self) -> dict[str, Any]:
        (done,) = self.of_type("agent_judgement_complete")
        return done


async def judge(
    ws: websockets.ClientConnection,
    agent_ids: list[str],
    user_input: str = "Shall we have tea?",
    timeout: float = 20,
    **extra: Any,
) -> SessionRecord:
    """Send a judgement and collect its messages up to ``agent_judgement_complete``."""
    await send(
        ws,
        {
            "type": "agent_judgement",
            "agent_ids": agent_ids,
            "data": {"user_input": user_input},
            **extra,
        },
    )
    record = SessionRecord()
    while True:
        message = await recv(ws, timeout)
        assert "error" not in message, message
        record.messages.append(message)
        if message["type"] == "agent_judgement_complete":
            return record


def assert_well_formed(record: SessionRecord, agent_ids: list[str]) -> None:
    """DESIGN §2: seq 1..n without gaps, one final per agent, then one complete last."""
    assert record.seqs == list(range(1, len(record.messages) + 1))
    assert record.messages[0]["type"] == "agent_judgement_accepted"
    assert sorted(record.finals) == sorted(agent_ids)
    assert len(record.of_type("agent_judgement_final")) == len(agent_ids)
    assert record.messages[-1]["type"] == "agent_judgement_complete"
    assert len({m["session_id"] for m in record.messages}) == 1


def spawn_process(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m magi_gateway ARGS`` with ``env`` added to the environment."""
    full_env = {**os.environ, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "magi_gateway", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def spawn_gateway(env: dict[str, str], log_level: str | None = None) -> GatewayHandle:
    """A ``magi-gateway serve`` subprocess on a free port, once it is ready."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    process = spawn_process([*args, "--log-level", log_level] if log_level else args, env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise RuntimeError(f"gateway exited: {output}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return GatewayHandle(port=port, process=process)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError("gateway did not become ready")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


#: Substrings that would betray internal exception text in a client-visible frame.
LEAK_MARKERS = ("Traceback", "Error(", "Exception(", 'File "', "redis.", "orjson.", ".py")


def assert_clean_error(message: dict[str, Any], code: str) -> None:
    """An error frame with the expected ``code``, human text and no internal exception text."""
    assert message.get("code") == code, message
    assert isinstance(message.get("error"), str)
    assert message["error"]
    assert "type" not in message
    text = orjson.dumps(message).decode()
    for marker in LEAK_MARKERS:
        assert marker not in text, (marker, message)


async def collect_sessions(
    ws: websockets.ClientConnection, count: int, timeout: float = 20
) -> dict[str, SessionRecord]:
    """Read until ``count`` sessions completed on ``ws``; messages grouped by session id."""
    records: dict[str, SessionRecord] = {}
    done = 0
    while done < count:
        message = await recv(ws, timeout)
        assert "error" not in message, message
        records.setdefault(message["session_id"], SessionRecord()).messages.append(message)
        if message["type"] == "agent_judgement_complete":
            done += 1
    return records


def judgement_message(
    agent_ids: list[str], user_input: str = "Shall we have tea?", **extra: Any
) -> dict[str, Any]:
    """An ``agent_judgement`` client message."""
    return {"type": "agent_judgement", "agent_ids": agent_ids, "data": {"user_input": user_input}, **extra}


async def wait_live(worker: Worker, task: asyncio.Task[None]) -> None:
    """Wait for the worker's first heartbeat, so a gateway sees its agents as live
    (a ``task`` running it that ended raises its error)."""
    ids = list(worker.agents)
    for _ in range(200):
        if all((await worker.store.liveness.live_worker_counts(ids)).values()):
            return
        if task.done():
            task.result()
        await asyncio.sleep(0.02)


class Bridge(Protocol):
    """A bridge to a backend of the original system: a worker run until stopped."""

    @property
    def worker(self) -> Worker: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...


B = TypeVar("B", bound=Bridge)


@contextlib.asynccontextmanager
async def running_bridges(make: Callable[..., B]) -> AsyncIterator[Callable[..., Awaitable[B]]]:
    """``start(...)`` runs ``make(...)`` in this event loop until its agents are live; at the
    end every bridge is stopped, and each must have ended cleanly."""
    running: list[tuple[B, asyncio.Task[None]]] = []

    async def start(*args: Any, **kwargs: Any) -> B:
        bridge = make(*args, **kwargs)
        task = asyncio.create_task(bridge.run())
        running.append((bridge, task))
        await wait_live(bridge.worker, task)
        return bridge

    yield start
    for bridge, _task in running:
        bridge.stop()
    results = await asyncio.gather(*(task for _bridge, task in running), return_exceptions=True)
    assert results == [None] * len(running)
