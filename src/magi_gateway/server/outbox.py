"""One client connection's outbound side: a bounded buffer drained by a sender task.

The buffer holds at most ``max_messages`` frames. Overflow policy: **close 1013** —
when a client reads slower than its sessions produce, the connection is closed with
"try again later" instead of growing memory; every message is in the session log,
so the client resumes without loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER
from magi_gateway.core.ids import AppId, ConnectionId, SessionId
from magi_gateway.core.ratelimit import TokenBucket
from magi_gateway.server import metrics

__all__ = ["Connection"]

logger = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Connection:
    """Frames queued for one WebSocket, and the sessions attached to it."""

    def __init__(
        self,
        connection_id: ConnectionId,
        appid: AppId,
        *,
        max_messages: int,
        peer: str = "",
        rate_limit: TokenBucket | None = None,
    ) -> None:
        self.id = connection_id
        self.appid = appid
        self.peer = peer
        self.max_messages = max_messages
        #: Limits the client's messages (overflow policy: drop the frame, answer rate_limited).
        self.rate_limit = rate_limit
        self.sessions: set[SessionId] = set()
        self._frames: deque[bytes] = deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._close: tuple[int, str] | None = None

    @property
    def closing(self) -> bool:
        """Whether a close was requested; no more frames are accepted."""
        return self._close is not None

    def push(self, frame: bytes, kind: bytes | None = None) -> bool:
        """Queue ``frame`` (of type ``kind``, if known); on overflow request a 1013 close and return False."""
        if self._close is not None:
            return False
        if len(self._frames) >= self.max_messages:
            logger.warning("connection %s outbound buffer full; closing 1013", self.id)
            self.request_close(CLOSE_TRY_AGAIN_LATER, "Client too slow, resume later")
            return False
        self._frames.append(frame)
        self._wakeup.set()
        metrics.count_out(frame, kind)
        return True

    def request_close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Ask the sender to close the socket; queued frames are sent first only if ``flush``."""
        if self._close is None:
            self._close = (code, reason)
            if not flush:
                self._frames.clear()
            self._wakeup.set()
            self._room.set()

    async def wait_for_room(self, count: int) -> None:
        """Wait until ``count`` more frames fit in the buffer (or the connection closes)."""
        while self._close is None and len(self._frames) + count > self.max_messages:
            self._room.clear()
            await self._room.wait()

    async def run_sender(self, send_text: SendText, close: Close) -> None:
        """Send queued frames until a close is requested; then close the socket."""
        frames = self._frames
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while frames:
                await send_text(frames.popleft().decode())
                if len(frames) <= self.max_messages // 2:
                    self._room.set()
            self._room.set()
            if self._close is not None:
                await close(*self._close)
                return
