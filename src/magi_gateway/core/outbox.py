"""A connection's outbound buffer, sans-I/O: bounded, with a named overflow policy.

The buffer holds at most ``max_messages`` frames and ``max_bytes`` bytes of them (one
frame larger than ``max_bytes``, or one run of chunks larger than either bound, still
fits into an empty buffer, so no single message or burst can wedge a session).
Overflow policy: **close 1013** — when a client reads slower than its sessions
produce, the connection is closed with "try again later" instead of growing memory;
every session message is in the session's log, so the client resumes without loss.
Replays do not overflow it: they wait for room (``has_room``) first. The driver
(``server.outbox``) writes what ``pop`` hands it and wakes whoever waits for room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER

__all__ = ["DEFAULT_MAX_BYTES", "Outbox"]

#: The byte bound of a buffer built without one (``MAX_OUTBOUND_BYTES``'s default).
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class Outbox:
    """Frames queued for one client, and whether (and how) it is to be closed."""

    __slots__ = ("_bytes", "_close", "_frames", "max_bytes", "max_messages")

    def __init__(self, max_messages: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._close: tuple[int, str] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued (the frames' lengths added up)."""
        return self._bytes

    @property
    def closing(self) -> bool:
        """Whether a close was requested; no more frames are accepted."""
        return self._close is not None

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close code and reason requested, if any."""
        return self._close

    def _fits(self, count: int, size: int) -> bool:
        if not self._frames:  # an empty buffer takes one frame of any size
            return count <= max(self.max_messages, 1)
        return len(self._frames) + count <= self.max_messages and self._bytes + size <= self.max_bytes

    def push(self, frame: bytes) -> bool:
        """Queue ``frame``; on overflow request a 1013 close and return False."""
        if self._close is not None:
            return False
        if not self._fits(1, len(frame)):
            self.request_close(CLOSE_TRY_AGAIN_LATER, "Client too slow, resume later")
            return False
        self._frames.append(frame)
        self._bytes += len(frame)
        return True

    def push_run(self, frames: Sequence[bytes], size: int) -> bool:
        """Queue all of ``frames`` (``size`` bytes in all) if they fit within both bounds,
        or if the buffer is empty; False, with nothing queued, if not (then ``push`` them
        one by one: the overflow policy is the same frame by frame).

        An empty buffer takes a run whole, as it takes one frame of any size: a run is
        one notification's chunks of one session (at most the worker's run, 64 per agent,
        bounded in bytes by its queue), handed over in one step before the writer can take any, so
        a client that reads is never closed for the size of a burst."""
        if self._close is not None:
            return False
        full = len(self._frames) + len(frames) > self.max_messages or self._bytes + size > self.max_bytes
        if full and self._frames:
            return False
        self._frames.extend(frames)
        self._bytes += size
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
            self._bytes = 0
        return True

    def take(self) -> list[bytes]:
        """Every queued frame, oldest first, removed from the buffer (for one write)."""
        frames = list(self._frames)
        self._frames.clear()
        self._bytes = 0
        return frames

    def pop(self) -> bytes | None:
        """The oldest queued frame, or None."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self._bytes -= len(frame)
        return frame

    def has_room(self, count: int, size: int = 0) -> bool:
        """Whether ``count`` more frames of ``size`` bytes in all fit (True once closing,
        so waiters stop waiting)."""
        return self._close is not None or self._fits(count, size)

    @property
    def below_low_water(self) -> bool:
        """At most half full, in frames and in bytes: a good moment to wake a replay."""
        return len(self._frames) <= self.max_messages // 2 and self._bytes <= self.max_bytes // 2
