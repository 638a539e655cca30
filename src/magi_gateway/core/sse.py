"""The ``/v1`` HTTP API's wire format, sans-I/O: Server-Sent Events, credentials, cursors.

An SSE event is one session message: ``id: <seq>``, ``event: <type>``, ``data: <frame>``,
where the frame is byte for byte what a WebSocket client receives (compact JSON, so it
never holds a newline and fits one ``data:`` line). An idle stream carries comments
(``: keepalive``), which clients ignore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from magi_gateway.core.errors import ProtocolError
from magi_gateway.core.protocol import MAX_SEQ

__all__ = ["KEEPALIVE", "Credentials", "EventReader", "ReadEvent", "credentials", "cursor", "event"]

#: A comment line: keeps proxies and clients from timing out an idle stream.
KEEPALIVE = b": keepalive\n\n"
_BEARER = "bearer "


def event(seq: int, kind: bytes, frame: bytes) -> bytes:
    """The SSE event of one session message."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind, frame)


Credentials = tuple[str, str]


def credentials(headers: Mapping[str, str], query: Mapping[str, str]) -> Credentials:
    """``(appid, token)`` a request presents: ``Authorization: Bearer <JWT>`` (appid from
    ``X-Magi-Appid`` when given, else the JWT's ``sub``), else ``X-Magi-Appid`` and
    ``X-Magi-Token``, else the ``appid`` and ``token`` query parameters, as on ``/ws``."""
    authorization = headers.get("authorization", "")
    if authorization[: len(_BEARER)].lower() == _BEARER:
        return headers.get("x-magi-appid", ""), authorization[len(_BEARER) :].strip()
    if "x-magi-token" in headers:
        return headers.get("x-magi-appid", ""), headers["x-magi-token"]
    return query.get("appid", ""), query.get("token", "")


def cursor(last_event_id: str | None, last_seq: str | None) -> int:
    """The seq a stream resumes after: the ``Last-Event-ID`` header, else ``?last_seq``, else 0."""
    name, value = ("Last-Event-ID", last_event_id) if last_event_id is not None else ("last_seq", last_seq)
    if value is None or value == "":
        return 0
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 16 or int(value) > MAX_SEQ:
        raise ProtocolError(f"{name} must be an integer from 0 to {MAX_SEQ}", code="invalid_field")
    return int(value)


@dataclass(frozen=True, slots=True)
class ReadEvent:
    """An event as a client reads it (``data`` lines joined by newlines)."""

    id: str | None
    event: str
    data: str


class EventReader:
    """A client's SSE parser: feed it lines (without their line ending), get events."""

    __slots__ = ("_data", "_event", "_id")

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ReadEvent | None:
        """The event a blank line ends, else None (comments and fields are kept or skipped)."""
        if not line:
            if not self._data:
                self._event = ""
                return None
            done = ReadEvent(self._id, self._event or "message", "\n".join(self._data))
            self._id, self._event, self._data = None, "", []
            return done
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None
