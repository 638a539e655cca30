"""``MagiClient``: an async Python client for the gateway.

::

    async with MagiClient("ws://127.0.0.1:8000/ws", appid="demo", secret="…") as client:
        async for message in client.judge("Shall we have tea?", ["melchior", "balthasar", "casper"]):
            print(message)

Each ``judge`` yields the session's messages in order, up to and including
``agent_judgement_complete``. One connection carries any number of judgements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets

from .auth import compute_token, minute_of
from .errors import GatewayError

__all__ = ["MagiClient"]

#: Messages buffered per judgement before the reader waits for the consumer (policy: block).
_QUEUE_SIZE = 1024


class MagiClient:
    """A connection to one gateway, shared by concurrent judgements."""

    def __init__(self, url: str, *, appid: str, secret: str, open_timeout_s: float = 10) -> None:
        self.url = url
        self.appid = appid
        self.secret = secret
        self.open_timeout_s = open_timeout_s
        self.connection_id: str | None = None
        self._ws: websockets.ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_SIZE)
        self._sessions: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    def token(self) -> str:
        """A token for this minute."""
        return compute_token(self.appid, self.secret, minute_of(time.time()))

    async def connect(self) -> None:
        """Open the WebSocket and wait for ``connection_established``."""
        query = urlencode({"appid": self.appid, "token": self.token()})
        self._ws = await websockets.connect(
            f"{self.url}?{query}", open_timeout=self.open_timeout_s, max_size=None
        )
        hello = orjson.loads(await self._ws.recv())
        if hello.get("type") != "connection_established":
            await self._ws.close()
            raise GatewayError(hello.get("error", "connection refused"), code=hello.get("code"))
        self.connection_id = hello["connection_id"]
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Close the connection."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> MagiClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            message = orjson.loads(raw)
            session_id = message.get("session_id")
            if message.get("type") == "agent_judgement_accepted":
                queue = self._sessions.setdefault(session_id, asyncio.Queue(_QUEUE_SIZE))
                await self._replies.put(message)
                await queue.put(message)
            elif session_id in self._sessions:
                await self._sessions[session_id].put(message)
            else:
                await self._replies.put(message)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise GatewayError("not connected", code="not_connected")
        await self._ws.send(orjson.dumps(message).decode())

    async def _reply(self) -> dict[str, Any]:
        reply = await self._replies.get()
        if "error" in reply:
            raise GatewayError(reply["error"], code=reply.get("code"))
        return reply

    async def agents(self) -> list[dict[str, Any]]:
        """Agents that have live workers."""
        await self._send({"type": "get_agents"})
        reply = await self._reply()
        agents: list[dict[str, Any]] = reply["agents"]
        return agents

    async def judge(
        self,
        user_input: str,
        agent_ids: Sequence[str],
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask ``agent_ids`` to judge ``user_input``; yield the session's messages."""
        message: dict[str, Any] = {
            "type": "agent_judgement",
            "agent_ids": list(agent_ids),
            "data": {"user_input": user_input},
        }
        if request_id is not None:
            message["request_id"] = request_id
        await self._send(message)
        accepted = await self._reply()
        session_id = accepted["session_id"]
        queue = self._sessions[session_id]
        try:
            while True:
                item = await queue.get()
                yield item
                if item.get("type") == "agent_judgement_complete":
                    return
        finally:
            self._sessions.pop(session_id, None)
