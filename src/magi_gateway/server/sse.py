"""One session as a Server-Sent Events response: from a cursor, then live, until it completes.

The stream reads the session's log after its cursor (``redis.follow``: ``XREAD``, at
most ``_PAGE`` messages at a time) and writes each page as one body chunk of SSE events
(``core.sse``). Nothing else is queued: the next page is read only once the previous one
was handed to the transport, so what a stream holds is one page plus the transport's
buffer (uvicorn stops accepting writes past its high-water mark). Overflow policy for a
client that stops reading: once a write has waited ``SSE_WRITE_TIMEOUT_S``, the stream
ends and the connection is dropped; the client resumes from the last event it got
(``Last-Event-ID``) with nothing lost, the log being the truth.

The stream ends after ``agent_judgement_complete``; when the client leaves; when the
server shuts down (``StreamControl.closing``) or stops accepting; when its JWT expires
(an ``error`` event ``token_expired`` first); or when the session is gone (an ``error``
event ``session_not_found``). An idle stream gets ``: keepalive`` every
``SSE_KEEPALIVE_S``, and a Redis outage is ridden out with backoff and keepalives.

A stream of a running session is one of its viewers (``server.stream_viewer``, joined
before the response starts): it renews its lease in a task of its own while it runs, and
leaves when it ends, whichever way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from magi_gateway._util import Backoff
from magi_gateway.core import frames, sse
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable, GatewayError, SessionNotFound
from magi_gateway.redis.follow import SessionFollower
from magi_gateway.server import metrics
from magi_gateway.server.http_protocol import STREAM_CONTROL, StreamControl
from magi_gateway.server.stream_viewer import StreamViewer

__all__ = ["HEADERS", "EventStream", "StreamSlots"]

logger = logging.getLogger(__name__)

#: Messages read from the log at a time (and so the most one stream holds besides the
#: transport's buffer).
_PAGE = 16
_COMPLETE = b"agent_judgement_complete"
#: No buffering anywhere on the way (nginx honours ``X-Accel-Buffering``), never compressed.
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-encoding", b"identity"),
]


class StreamSlots:
    """The event streams open on this instance, at most ``limit`` (overflow: refuse, 503)."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        """Count one more stream, unless ``limit`` are open."""
        if self.open >= self.limit:
            return False
        self.open += 1
        metrics.SSE_STREAMS.inc()
        return True

    def give_back(self) -> None:
        """A stream ended."""
        self.open -= 1
        metrics.SSE_STREAMS.dec()


class _End(enum.Enum):
    DONE = "said all it will"
    SLOW = "slow reader"
    LEFT = "client left"
    CLOSING = "server closing"


class EventStream(Response):
    """A response streaming ``session_id`` after ``after_seq`` as ``viewer``; at the end it
    leaves and ``on_close`` runs."""

    def __init__(
        self,
        follower: SessionFollower,
        viewer: StreamViewer,
        after_seq: int,
        *,
        keepalive_s: float,
        write_timeout_s: float,
        backoff: Callable[[], Backoff],
        accepting: Callable[[], bool],
        on_close: Callable[[], None],
        expires_at: float | None = None,
    ) -> None:
        # Not Response.__init__: no body; the headers are sent by __call__.
        self.status_code = 200
        self.background = None
        self.follower = follower
        self.viewer = viewer
        self.session_id = viewer.session_id
        self.cursor = after_seq
        self.keepalive_s = keepalive_s
        self.write_timeout_s = write_timeout_s
        self._backoff = backoff
        self._accepting = accepting
        self._on_close = on_close
        self.expires_at = expires_at
        self._send: Send | None = None
        self._last_write = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control: StreamControl | None = scope.get("extensions", {}).get(STREAM_CONTROL)
        self._send = send
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            end = await self._run(receive, control)
            if end is _End.SLOW:
                logger.info("event stream of %s: client stopped reading; dropped", self.session_id)
                metrics.SSE_STREAMS_DROPPED.inc()
                if control is not None:
                    control.abort()
                    # Once the server has seen the connection go, an unfinished response is
                    # expected (not an error to log).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_left(receive), 1.0)
                return  # without a control, the server closes the unfinished response
            if end is not _End.LEFT:
                with contextlib.suppress(TimeoutError):
                    await self._write(b"", more=False)
        finally:
            try:
                await self.viewer.leave()
            finally:
                self._on_close()

    async def _run(self, receive: Receive, control: StreamControl | None) -> _End:
        """Follow the session until it ends, the client leaves or the server closes."""
        follow = asyncio.create_task(self._follow())
        waits: set[asyncio.Task[object]] = {follow, asyncio.create_task(_left(receive))}
        if control is not None:
            waits.add(asyncio.create_task(control.closing.wait()))
        # Not awaited: the lease is held until the stream ends (it returns only if uncounted).
        lease = asyncio.create_task(self.viewer.hold())
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*waits, lease):
                task.cancel()
            await asyncio.gather(*waits, lease, return_exceptions=True)
        if follow.done() and not follow.cancelled():
            return follow.result()  # (or its exception: a bug, for uvicorn to log)
        return _End.CLOSING if control is not None and control.closing.is_set() else _End.LEFT

    async def _write(self, body: bytes, *, more: bool = True) -> None:
        assert self._send is not None
        message: Message = {"type": "http.response.body", "body": body, "more_body": more}
        # The send waits while the transport is over its high-water mark: the client reads.
        await asyncio.wait_for(self._send(message), self.write_timeout_s)
        self._last_write = time.monotonic()

    async def _follow(self) -> _End:
        """Write the session's messages after the cursor until it completes (or cannot go on)."""
        backoff = self._backoff()
        block = False  # the first read does not wait: a finished session ends at once
        saw_completed = False
        self._last_write = time.monotonic()
        try:
            while self._accepting():
                if self.expires_at is not None and time.time() >= self.expires_at:
                    return await self._error(GatewayError("Token expired", code="token_expired"))
                completed: bool | None = False
                try:
                    entries = await self.follower.read_after(
                        self.session_id, self.cursor, count=_PAGE, block_ms=self._block_ms() if block else 0
                    )
                    if not entries:
                        if block:  # the wait ran out: the stream is idle
                            await self._write(sse.KEEPALIVE)
                        completed = await self.follower.completed(self.session_id)
                    backoff.reset()
                except BackendUnavailable as exc:
                    await asyncio.sleep(
                        min(
                            backoff.failed(logger, f"event stream of {self.session_id}", exc),
                            self.keepalive_s,
                        )
                    )
                    if time.monotonic() - self._last_write >= self.keepalive_s:
                        await self._write(sse.KEEPALIVE)
                    continue
                if entries:
                    await self._write(b"".join(sse.event(seq, kind, frame) for seq, kind, frame in entries))
                    self.cursor = entries[-1][0]
                    if entries[-1][1] == _COMPLETE:
                        return _End.DONE
                    block = len(entries) < _PAGE
                    continue
                if completed is None:
                    return await self._error(SessionNotFound("Session not found or expired"))
                if completed:
                    # Its end is in the log: read once more (it may have come after the read
                    # above); nothing then means the cursor is at or past the end.
                    if saw_completed:
                        return _End.DONE
                    saw_completed, block = True, False
                    continue
                block = True
        except TimeoutError:
            return _End.SLOW
        except BackendCommandError as exc:
            logger.error("event stream of %s failed: %s", self.session_id, exc.__cause__)
            with contextlib.suppress(TimeoutError):
                await self._error(exc)
        return _End.CLOSING

    def _block_ms(self) -> int:
        """How long a read may wait: until a keepalive is due (or the token expires)."""
        until = self.keepalive_s - (time.monotonic() - self._last_write)
        if self.expires_at is not None:
            until = min(until, self.expires_at - time.time())
        return max(int(until * 1000), 1)

    async def _error(self, exc: GatewayError) -> _End:
        """End the stream with an ``error`` event (the WebSocket's error frame)."""
        if exc.session_id is None:
            exc.session_id = self.session_id
        await self._write(b"event: error\ndata: %s\n\n" % frames.error_frame(exc))
        return _End.DONE


async def _left(receive: Receive) -> None:
    """Return when the client has gone (``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass
