"""Group commit of what ends a request: its ack, and its session's exit from the deadline sweep.

Each job writes its own final (its outcome matters to that job). What follows, ``XACK``
and ``XDEL`` of the request and, when that final completed the session, ``ZREM`` of its
deadline, goes with every other job's in one round trip (``RequestQueue.finish``). Each
job waits for its batch, so at most one entry per running job is queued: bounded by the
worker's concurrency (overflow policy: none needed, callers wait). A failed round trip is
logged, not retried: an unacknowledged request is taken over later and finds its final
written; a deadline left in the sweep is cleared when the sweep reaches it.
"""

from __future__ import annotations

import asyncio
import logging

from magi_gateway._tasks import cancel_and_wait
from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.redis.requests import Request, RequestQueue

__all__ = ["RequestFinisher"]

logger = logging.getLogger(__name__)

_Entry = tuple[Request, Request | None, "asyncio.Future[None]"]


class RequestFinisher:
    """Acknowledges finished requests of a worker, batch after batch."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self._waiting: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Round trips made (for tests and benchmarks).
        self.round_trips = 0

    async def finish(self, request: Request, *, completed: bool = False) -> None:
        """Acknowledge ``request`` (and clear its session's deadline when ``completed``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, request if completed else None, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="magi-request-finisher")
        await done

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait up to ``timeout_s`` for the round trip in flight, then cancel it."""
        if self._flusher is not None:
            _done, pending = await asyncio.wait({self._flusher}, timeout=timeout_s)
            await cancel_and_wait(pending)

    async def _flush(self) -> None:
        batch: list[_Entry] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    completed = [done for _, done, _ in batch if done is not None]
                    await self.queue.finish([request for request, _, _ in batch], completed)
                except BackendUnavailable:
                    logger.warning("could not acknowledge %d requests; they will be taken over", len(batch))
                self.round_trips += 1
                _release(batch)
        finally:
            self._flusher = None
            _release(batch)  # cancelled mid-batch (shutdown): nobody waits for the outcome
            _release(self._waiting)


def _release(entries: list[_Entry]) -> None:
    for *_, done in entries:
        if not done.done():
            done.set_result(None)
