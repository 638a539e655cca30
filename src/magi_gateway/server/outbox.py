"""One client connection's outbound side: the core's ``Outbox`` driven by a sender task.

The buffer and its overflow policy (close 1013) are the core's (``core.outbox``);
this driver adds the wake-ups: the sender waits for frames, replays wait for room.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from magi_gateway.core.ids import AppId, ConnectionId
from magi_gateway.core.outbox import DEFAULT_MAX_BYTES, Outbox
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
        peer: str = "",
        rate_limit: TokenBucket | None = None,
    ) -> None:
        self.id = connection_id
        self.appid = appid
        self.peer = peer
        #: Limits the client's messages (overflow policy: drop the frame, answer rate_limited).
        self.rate_limit = rate_limit
        self.outbox = Outbox(max_messages, max_bytes)
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()

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
        was_closing = self.outbox.closing
        if not self.outbox.push(frame):
            if not was_closing:  # this frame overflowed the buffer: the close starts now
                logger.warning("connection %s outbound buffer full; closing 1013", self.id)
                self._wake_all()
            return False
        self._wakeup.set()
        metrics.count_out(frame, kind)
        return True

    def request_close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Ask the sender to close the socket; queued frames are sent first only if ``flush``."""
        if self.outbox.request_close(code, reason, flush=flush):
            self._wake_all()

    def _wake_all(self) -> None:
        self._wakeup.set()
        self._room.set()

    async def wait_for_room(self, count: int, size: int = 0) -> None:
        """Wait until ``count`` more frames of ``size`` bytes fit in the buffer (or the
        connection closes)."""
        while not self.outbox.has_room(count, size):
            self._room.clear()
            await self._room.wait()

    async def run_sender(self, send_text: SendText, close: Close) -> None:
        """Send queued frames until a close is requested; then close the socket."""
        outbox = self.outbox
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while (frame := outbox.pop()) is not None:
                try:
                    text = frame.decode()
                except UnicodeDecodeError:
                    # Frames come from Redis: one that is no text is skipped, not fatal.
                    metrics.BAD_FRAMES.inc()
                    logger.warning("connection %s: skipped a frame that is not UTF-8", self.id)
                    continue
                await send_text(text)
                if outbox.below_low_water:
                    self._room.set()
            self._room.set()
            if (reason := outbox.close_reason) is not None:
                await close(*reason)
                return
