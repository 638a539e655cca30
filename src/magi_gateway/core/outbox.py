"""A connection's outbound buffer, sans-I/O: bounded, with a named overflow policy.

The buffer holds at most ``max_messages`` frames. Overflow policy: **close 1013** —
when a client reads slower than its sessions produce, the connection is closed with
"try again later" instead of growing memory; every session message is in the
session's log, so the client resumes without loss. The driver (``server.outbox``)
writes what ``take`` hands it and wakes whoever waits for room.
"""

from __future__ import annotations

from collections import deque

from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER

__all__ = ["Outbox"]


class Outbox:
    """Frames queued for one client, and whether (and how) it is to be closed."""

    __slots__ = ("_close", "_frames", "max_messages")

    def __init__(self, max_messages: int) -> None:
        self.max_messages = max_messages
        self._frames: deque[bytes] = deque()
        self._close: tuple[int, str] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def closing(self) -> bool:
        """Whether a close was requested; no more frames are accepted."""
        return self._close is not None

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close code and reason requested, if any."""
        return self._close

    def push(self, frame: bytes) -> bool:
        """Queue ``frame``; on overflow request a 1013 close and return False."""
        if self._close is not None:
            return False
        if len(self._frames) >= self.max_messages:
            self.request_close(CLOSE_TRY_AGAIN_LATER, "Client too slow, resume later")
            return False
        self._frames.append(frame)
        return True

    def request_close(self, code: int, reason: str, *, flush: bool = False) -> bool:
        """Ask for the socket to be closed; queued frames are kept only if ``flush``.

        Returns False when a close was requested already (the first one wins).
        """
        if self._close is not None:
            return False
        self._close = (code, reason)
        if not flush:
            self._frames.clear()
        return True

    def take(self) -> list[bytes]:
        """Every queued frame, oldest first, removed from the buffer (for one write)."""
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def pop(self) -> bytes | None:
        """The oldest queued frame, or None."""
        return self._frames.popleft() if self._frames else None

    def has_room(self, count: int) -> bool:
        """Whether ``count`` more frames fit (False once closing, so waiters stop waiting)."""
        return self._close is not None or len(self._frames) + count <= self.max_messages

    @property
    def below_low_water(self) -> bool:
        """At most half full: a good moment to wake a replay waiting for room."""
        return len(self._frames) <= self.max_messages // 2
