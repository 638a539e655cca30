"""An SSE reader for the ``/v1`` tests: raw events as the wire carries them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from ._support import APPID, make_token


@dataclass
class Event:
    """One SSE event (or comment), with its raw ``data`` bytes."""

    id: int | None = None
    event: str | None = None
    data: bytes = b""
    comments: list[str] = field(default_factory=list)

    @property
    def message(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.data)
        return result


def auth(appid: str = APPID) -> dict[str, str]:
    """The seed-token credentials as headers."""
    return {"X-Magi-Appid": appid, "X-Magi-Token": make_token(appid)}


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events of an SSE response, in order; comments come as events without data."""
    current = Event()
    async for line in response.aiter_lines():
        if line == "":
            if current.data or current.event or current.comments:
                yield current
            current = Event()
        elif line.startswith(":"):
            current.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(": ")
            if name == "id":
                current.id = int(value)
            elif name == "event":
                current.event = value
            elif name == "data":
                current.data = value.encode()
    if current.data or current.event:
        yield current


async def collect(response: httpx.Response) -> list[Event]:
    """Every event with data, until the stream ends."""
    return [e async for e in events(response) if e.data]
