"""The ``limit`` baseline's Redis client: RESP over one asyncio connection, parsed by hiredis.

Part of the baseline (shares no code with the product, and not redis-py's either: its
per-command overhead is what a minimal relay can do without). Commands written within
one event-loop tick go out in one ``write`` (auto-pipelining); replies are matched to
commands in order. A subscribed connection hands every pushed message to a callback.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, cast

import hiredis

__all__ = ["RespConnection", "encode"]


def encode(*args: bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespConnection(asyncio.Protocol):
    """One Redis connection: ``send`` (reply dropped), ``call`` (reply awaited) or ``subscribe``."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        #: One entry per command in flight: its future, or None when its reply is dropped.
        self.waiting: collections.deque[asyncio.Future[Any] | None] = collections.deque()
        self.out: list[bytes] = []
        self.on_message: Callable[[bytes, bytes], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int) -> RespConnection:
        """Connect to ``host:port``."""
        _transport, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every command still waiting."""
        error = exc or ConnectionError("Redis closed the connection")
        for future in self.waiting:
            if future is not None and not future.done():
                future.set_exception(error)
        self.waiting.clear()
        if not self.closed.done():
            self.closed.set_exception(error)
            self.closed.exception()  # retrieved: a close nobody awaits is not an error

    def _flush(self) -> None:
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _queue(self, command: bytes, future: asyncio.Future[Any] | None) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(command)
        self.waiting.append(future)

    def send(self, *args: bytes) -> None:
        """Queue a command whose reply is dropped (an error reply is raised, in the loop)."""
        self._queue(encode(*args), None)

    def call(self, *args: bytes) -> asyncio.Future[Any]:
        """Queue a command; the future gets its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(encode(*args), future)
        return future

    async def subscribe(self, channel: bytes, on_message: Callable[[bytes, bytes], None]) -> None:
        """SUBSCRIBE to ``channel``; from then on ``on_message(channel, data)`` gets each message."""
        self.on_message = on_message
        await self.call(b"SUBSCRIBE", channel)

    def data_received(self, data: bytes) -> None:
        """Parse replies and deliver them in order (messages, once subscribed)."""
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:
                if self.on_message is None:
                    raise ConnectionError(f"unexpected reply from Redis: {reply!r}")
                self.on_message(reply[1], reply[2])
                continue
            future = self.waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                if future is None:
                    raise reply
                future.set_exception(reply)
            elif future is not None:
                future.set_result(reply)

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()
