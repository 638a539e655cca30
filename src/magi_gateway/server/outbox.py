"""One client connection, as the drivers see it: the core's ``ClientProtocol`` (who it
is, how fast it may talk) and ``Outbox`` (what it is sent), plus the wake-ups.

The buffer and its overflow policy (close 1013) are the core's (``core.outbox``).
Two ways to drain it, one per driver:

- the ASGI driver runs ``run_sender``, a task that waits for frames and sends them
  one by one;
- the fast driver (``server.ws_protocol``) registers a ``writer`` callback, called
  when the first frame is queued; it takes every queued frame with ``take`` and
  writes them in one go, then calls ``drained``.

Replays wait for room (``wait_for_room``) either way. Client frames are handled in
order: commands (judgements, resumes, cancels) one at a time, from ``commands``.

A connection authenticated by a JWT has a timer at the token's ``exp`` (re-armed by a
``refresh``): then it is sent ``token_expired`` and closed with 4001, by either driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from magi_gateway.core import frames
from magi_gateway.core.connection import ClientProtocol, Received
from magi_gateway.core.errors import CLOSE_AUTH_FAILED
from magi_gateway.core.ids import AppId, ConnectionId
from magi_gateway.core.jwt_auth import JwtVerifier
from magi_gateway.core.outbox import DEFAULT_MAX_BYTES, Outbox
from magi_gateway.core.protocol import Limits
from magi_gateway.core.ratelimit import TokenBucket
from magi_gateway.server import metrics

__all__ = ["Connection"]

logger = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Connection:
    """Frames queued for one WebSocket, and who it belongs to."""

    def __init__(
        self,
        connection_id: ConnectionId,
        appid: AppId,
        *,
        max_messages: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        limits: Limits | None = None,
        peer: str = "",
        rate_limit: TokenBucket | None = None,
        expires_at: float | None = None,
        jwt: JwtVerifier | None = None,
    ) -> None:
        self.client = ClientProtocol(
            connection_id, appid, limits or Limits(), rate_limit, jwt=jwt, expires_at=expires_at
        )
        self.peer = peer
        self.outbox = Outbox(max_messages, max_bytes)
        #: Client frames waiting for their turn, in order: commands (at most one runs
        #: at a time) and the answers of frames that came after them.
        self.commands: deque[Received] = deque()
        #: The task running ``commands``, while there are any.
        self.commands_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._writer: Callable[[], None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        if expires_at is not None or jwt is not None:
            self.client.on_expiry_change = self._arm_expiry
            self._arm_expiry()

    @property
    def id(self) -> ConnectionId:
        """The connection's id (in ``connection_established`` and the logs)."""
        return self.client.id

    @property
    def appid(self) -> AppId:
        """The appid the connection authenticated as."""
        return self.client.appid

    @property
    def max_messages(self) -> int:
        """Frames the outbox holds before the connection is closed with 1013."""
        return self.outbox.max_messages

    @property
    def max_bytes(self) -> int:
        """Bytes the outbox holds before the connection is closed with 1013."""
        return self.outbox.max_bytes

    @property
    def closing(self) -> bool:
        """Whether a close was requested; no more frames are accepted."""
        return self.outbox.closing

    def push(self, frame: bytes, kind: bytes) -> bool:
        """Queue ``frame`` (``kind``: its type, for the counters); on overflow close 1013, return False."""
        outbox = self.outbox
        was_closing = outbox.closing
        if not outbox.push(frame):
            if not was_closing:  # this frame overflowed the buffer: the close starts now
                logger.warning("connection %s outbound buffer full; closing 1013", self.id)
                self._wake_all()
            return False
        if len(outbox) == 1:
            self._wake_writer()
        metrics.count_out(frame, kind)
        return True

    def push_run(self, frames: Sequence[bytes], size: int, kind: bytes) -> bool:
        """Queue several frames of one ``kind`` (``size`` bytes in all) at once; as ``push``
        of each in turn (on overflow: close 1013, False)."""
        outbox = self.outbox
        was_empty = not len(outbox)
        if not outbox.push_run(frames, size):
            return all(self.push(frame, kind) for frame in frames)
        if was_empty:
            self._wake_writer()
        metrics.count_out_run(kind, len(frames), size)
        return True

    def request_close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Ask the driver to close the socket; queued frames are sent first only if ``flush``."""
        if self.outbox.request_close(code, reason, flush=flush):
            self._wake_all()

    # -- the token's expiry ----------------------------------------------------------

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires_at = self.client.expires_at
        if expires_at is not None and not self.closing:
            delay = max(0.0, expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        expires_at = self.client.expires_at
        if expires_at is not None and expires_at > time.time():
            self._arm_expiry()  # the loop's clock ran ahead of the wall clock
            return
        logger.info("connection %s: token expired; closing 4001", self.id)
        self.push(frames.TOKEN_EXPIRED, b"error")
        self.request_close(CLOSE_AUTH_FAILED, "Token expired", flush=True)

    def stop_expiry(self) -> None:
        """The connection is gone: its expiry timer with it."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.client.on_expiry_change = None

    # -- the fast driver's side ------------------------------------------------------

    def set_writer(self, writer: Callable[[], None]) -> None:
        """Call ``writer`` whenever frames (or a close) wait in an empty-until-now outbox."""
        self._writer = writer

    def take(self) -> list[bytes]:
        """Every queued frame, oldest first, for one write."""
        return self.outbox.take()

    def drained(self) -> None:
        """The driver wrote what it took: a replay waiting for room may go on."""
        if self._room is not None:
            self._room.set()

    # -- wake-ups ------------------------------------------------------------------

    def _wake_writer(self) -> None:
        if self._writer is not None:
            self._writer()
        elif self._wakeup is not None:
            self._wakeup.set()

    def _wake_all(self) -> None:
        self._wake_writer()
        self.drained()

    async def wait_for_room(self, count: int, size: int = 0) -> None:
        """Wait until ``count`` more frames of ``size`` bytes fit in the buffer (or the
        connection closes)."""
        while not self.outbox.has_room(count, size):
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    async def run_sender(self, send_text: SendText, close: Close) -> None:
        """Send queued frames until a close is requested; then close the socket."""
        outbox = self.outbox
        wakeup = self._wakeup = asyncio.Event()
        wakeup.set()  # frames queued before the sender started (the greeting)
        while True:
            await wakeup.wait()
            wakeup.clear()
            while (frame := outbox.pop()) is not None:
                try:
                    text = frame.decode()
                except UnicodeDecodeError:
                    skipped_bad_frame(self.id)
                    continue
                await send_text(text)
                if outbox.below_low_water:
                    self.drained()
            self.drained()
            if (reason := outbox.close_reason) is not None:
                await close(*reason)
                return


def skipped_bad_frame(connection_id: ConnectionId) -> None:
    """Frames come from Redis: one that is no text is skipped and counted, not fatal."""
    metrics.BAD_FRAMES.inc()
    logger.warning("connection %s: skipped a frame that is not UTF-8", connection_id)
