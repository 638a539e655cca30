"""The load generator's HTTP/1.1 + Server-Sent Events client, on asyncio streams.

One keep-alive connection per closed-loop client: ``POST /v1/judgements`` with
``Accept: text/event-stream``, then the events of the session's stream until the
response body ends, then the next request on the same connection.

Hand-written rather than httpx: the load generator shares the machine's two cores
with what it measures, and per event this parser costs a fraction of httpx's
(``aiter_lines`` over its transport layers); the WebSocket side's client
(``websockets``) is as lean. It reads exactly what uvicorn sends: a status line,
headers, then a chunked or ``Content-Length`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

__all__ = ["HttpStatusError", "SseConnection", "open_many"]

_MAX_HEADER_BYTES = 64 * 1024


class HttpStatusError(Exception):
    """A response other than ``200`` with an event stream: its status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body


class SseConnection:
    """One HTTP/1.1 connection to the gateway, reused request after request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host
        self.closed = False

    @classmethod
    async def open(cls, url: str) -> SseConnection:
        """Connect to ``url``'s host and port (``http://`` only: the bench runs on 127.0.0.1)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not an http:// URL: {url}")
        port = parts.port or 80
        reader, writer = await asyncio.open_connection(parts.hostname, port, limit=_MAX_HEADER_BYTES)
        return cls(reader, writer, f"{parts.hostname}:{port}")

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def stream(self, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """POST ``body`` to ``path``; yield each event's ``data`` (joined lines) until the body ends.

        A status other than 200 raises ``HttpStatusError`` once its body is read. The
        connection stays usable after a body read to its end, unless the server said
        ``Connection: close``.
        """
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {self._host}",
            "Accept: text/event-stream",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get(b"connection") == b"close":
            self.closed = True
        chunked = fields.get(b"transfer-encoding") == b"chunked"
        length = int(fields.get(b"content-length", b"0"))
        if status != 200:
            rest = b"".join([piece async for piece in self._body(chunked, length)])
            raise HttpStatusError(status, rest)
        pending = b""
        async for piece in self._body(chunked, length):
            pending += piece.replace(b"\r\n", b"\n")
            while (end := pending.find(b"\n\n")) >= 0:
                event, pending = pending[:end], pending[end + 2 :]
                data = [_field(line) for line in event.split(b"\n") if line.startswith(b"data:")]
                if data:
                    yield b"\n".join(data)

    async def _body(self, chunked: bool, length: int) -> AsyncIterator[bytes]:
        if not chunked:
            if length:
                yield await self._reader.readexactly(length)
            return
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers: the blank line
                return
            piece = await self._reader.readexactly(size + 2)
            yield piece[:-2]


def _field(line: bytes) -> bytes:
    """A ``data:`` line's value: after the colon and one optional space."""
    return line[6:] if line[5:6] == b" " else line[5:]


async def open_many(url: str, count: int, concurrency: int, errors: Counter[str]) -> list[SseConnection]:
    """``count`` connections to ``url``, ``concurrency`` at a time; failures counted in ``errors``."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> SseConnection | None:
        async with gate:
            try:
                return await SseConnection.open(url)
            except OSError as exc:
                errors[f"connect: {type(exc).__name__}: {exc}"[:200]] += 1
                return None

    return [link for link in await asyncio.gather(*(one() for _ in range(count))) if link]
