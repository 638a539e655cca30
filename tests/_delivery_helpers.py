"""Helpers for the delivery, client and security tests: controllable agents, bounded polls."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from redis.asyncio import Redis

from magi_gateway import Context, Judgement, JudgementClosed, agent
from magi_gateway.redis.store import Store
from magi_gateway.worker.sdk import FunctionAgent

from ._support import GatewayHandle, SessionRecord, recv, spawn_gateway

DEMO = ["melchior", "balthasar", "casper"]


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 10, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)


async def logged(store: Store, session_id: str, first_seq: int = 1) -> list[dict[str, Any]]:
    """The session's stored messages from ``first_seq`` on, decoded."""
    return [orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, first_seq)]


async def wait_logged_complete(store: Store, session_id: str, timeout: float = 15) -> list[dict[str, Any]]:
    """The whole log once it ends with ``agent_judgement_complete``."""

    async def complete() -> list[dict[str, Any]] | None:
        messages = await logged(store, session_id)
        if messages and messages[-1]["type"] == "agent_judgement_complete":
            return messages
        return None

    result: list[dict[str, Any]] = await eventually(complete, timeout, what=f"session {session_id} complete")
    return result


async def collect_until_complete(
    ws: websockets.ClientConnection, session_id: str, timeout: float = 15
) -> list[dict[str, Any]]:
    """This session's messages on ``ws`` up to and including its complete (others fail)."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["type"] != "agent_judgement_complete":
        message = await recv(ws, timeout)
        assert "error" not in message, message
        assert message["session_id"] == session_id, message
        got.append(message)
    return got


async def read_until_closed(
    ws: websockets.ClientConnection, limit: int, timeout: float = 10
) -> tuple[list[dict[str, Any]], int | None]:
    """Messages until the connection closes, and the close code received (None: no close frame)."""
    got: list[dict[str, Any]] = []
    for _ in range(limit):
        try:
            got.append(orjson.loads(await asyncio.wait_for(ws.recv(), timeout)))
        except websockets.ConnectionClosed as closed:
            return got, closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError(f"still open after {limit} messages")


async def assert_nothing_more(ws: websockets.ClientConnection) -> None:
    """Nothing was queued for the client before the reply to this ping."""
    await ws.send('{"type":"ping"}')
    assert await asyncio.wait_for(ws.recv(), 10) == '{"type":"pong"}'


async def scan_keys(redis: Redis, pattern: str) -> list[bytes]:
    """Every key matching ``pattern`` (SCAN, not KEYS)."""
    return [key async for key in redis.scan_iter(match=pattern, count=500)]


def record_of(messages: list[dict[str, Any]]) -> SessionRecord:
    return SessionRecord(list(messages))


@dataclass
class Gated:
    """An agent that streams ``before`` chunks, waits for ``gate``, streams ``after``, approves."""

    name: str
    before: int = 3
    after: int = 3
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    invocations: int = 0
    agent: FunctionAgent = field(init=False)

    def __post_init__(self) -> None:
        @agent(self.name)
        async def run(user_input: str, ctx: Context) -> Judgement:
            self.invocations += 1
            for i in range(self.before):
                await ctx.think(f"before {i}")
            await asyncio.wait_for(self.gate.wait(), 30)
            for i in range(self.after):
                await ctx.think(f"after {i}")
            return Judgement(f"{self.name} approves", decision="approve")

        self.agent = run


@dataclass
class Sloth:
    """An agent that works for a long time (bounded) and records how it stopped."""

    name: str
    started: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str | None = None
    ctx_cancelled: bool | None = None
    agent: FunctionAgent = field(init=False)

    def __post_init__(self) -> None:
        @agent(self.name)
        async def run(user_input: str, ctx: Context) -> Judgement:
            try:
                for i in range(400):  # at most ~20 s
                    if i % 10 == 0:
                        await ctx.think(f"{self.name} still thinking ({i})")
                        self.started.set()
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.outcome = "cancelled"
                self.ctx_cancelled = ctx.cancelled
                self.stopped.set()
                raise
            except JudgementClosed:
                self.outcome = "closed"
                self.ctx_cancelled = ctx.cancelled
                self.stopped.set()
                raise
            self.outcome = "finished"
            self.stopped.set()
            return Judgement("done at last", decision="approve")

        self.agent = run


def make_quick(name: str) -> FunctionAgent:
    """An agent that streams one chunk and approves at once."""

    @agent(name)
    async def run(user_input: str, ctx: Context) -> Judgement:
        await ctx.think(f"{name} takes a quick look")
        return Judgement(f"{name} approves", decision="approve")

    return run


quick = make_quick("quick")


def spawn_quiet_gateway(env: dict[str, str]) -> GatewayHandle:
    """``_support.spawn_gateway``, logging warnings only (its output goes to a pipe)."""
    return spawn_gateway(env, log_level="warning")


async def stalled_connection(handle: GatewayHandle) -> websockets.ClientConnection:
    """A connection that really stops reading: tiny receive buffer, no compression, one frame queued."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", handle.port))
        return await websockets.connect(
            handle.ws_url(), sock=sock, max_queue=1, compression=None, max_size=None
        )
    except BaseException:
        sock.close()
        raise
