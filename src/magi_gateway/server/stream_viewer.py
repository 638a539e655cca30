"""A ``/v1`` event stream's place among its session's viewers (``redis.viewers``).

An event stream follows its session as a WebSocket viewer does, so it counts against
``MAX_VIEWERS_PER_SESSION`` the same way: it joins the session's viewers before its first
event (``TooManyViewers`` over the bound, answered 429), holds its place while it runs
(its own lease renewal, every third of ``VIEWER_LEASE_S``) and leaves when it ends,
however it ends. Failing that (this instance died, or Redis was down at the end), the
entry expires with its lease. A stream of a completed session only replays: it takes no
place (``counted`` false), as a WebSocket's replay of one does not.

The stream reads the log itself (``XREAD BLOCK``): it needs no notification, so its entry
is in the form the append scripts do not publish to (``redis.viewers``, ``notify=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from magi_gateway._util import Backoff
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import ConnectionId, InstanceId, SessionId
from magi_gateway.redis.viewers import Viewers

__all__ = ["StreamViewer"]

logger = logging.getLogger(__name__)

#: How long the ``leave`` at a stream's end may take (then the lease runs out instead).
_LEAVE_TIMEOUT_S = 1.0


class StreamViewer:
    """One event stream's registration as a viewer of ``session_id``."""

    def __init__(
        self,
        viewers: Viewers,
        instance_id: InstanceId,
        session_id: SessionId,
        *,
        max_viewers: int,
        lease_s: float,
        backoff: Callable[[], Backoff],
    ) -> None:
        self.viewers = viewers
        self.instance_id = instance_id
        self.session_id = session_id
        #: Event streams have no connection id of their own: a fresh one, unique here.
        self.connection_id = ConnectionId(f"sse-{secrets.token_hex(8)}")
        self.max_viewers = max_viewers
        self.lease_s = lease_s
        self._backoff = backoff
        #: Whether the stream takes a place (renewed, then left); false for a replay.
        self.counted = False

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def _ours(self) -> list[tuple[SessionId, ConnectionId]]:
        return [(self.session_id, self.connection_id)]

    async def join(self) -> None:
        """Take a place; ``TooManyViewers`` when the session has ``max_viewers`` already
        (``SessionNotFound`` when it is gone, ``BackendUnavailable`` when Redis is)."""
        await self.viewers.join(
            self.session_id,
            self.instance_id,
            self.connection_id,
            max_viewers=self.max_viewers,
            lease_ms=self._lease_ms,
            notify=False,
        )
        self.counted = True

    def count_later(self) -> None:
        """Count the stream without joining now (Redis could not be reached): the first
        renewal registers it (renewals are never refused)."""
        self.counted = True

    async def hold(self) -> None:
        """Renew the lease every third of it, until cancelled (the stream ended)."""
        if not self.counted:
            return
        retry = self._backoff()
        delay = self.lease_s / 3
        while True:
            await asyncio.sleep(delay)
            delay = self.lease_s / 3
            try:
                await self.viewers.renew(self.instance_id, self._ours, self._lease_ms, notify=False)
            except BackendUnavailable as exc:
                delay = min(
                    retry.failed(logger, f"viewer lease of an event stream of {self.session_id}", exc), delay
                )
                continue
            except BackendCommandError as exc:
                logger.error(
                    "viewer lease of an event stream of %s failed: %s", self.session_id, exc.__cause__
                )
                delay = min(retry.next_delay(), delay)
                continue
            retry.reset()

    async def leave(self) -> None:
        """Give the place back (at most once; failing that, the lease runs out)."""
        if not self.counted:
            return
        self.counted = False
        with contextlib.suppress(BackendUnavailable, BackendCommandError, TimeoutError):
            await asyncio.wait_for(
                self.viewers.leave(self.instance_id, self._ours, notify=False), _LEAVE_TIMEOUT_S
            )
