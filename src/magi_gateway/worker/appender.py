"""Thinking chunks on their way to the session logs: queued by the agents, written in batches.

``ctx.think`` does not wait for Redis. Each running request has a ``ChunkStream``; a
chunk is encoded (the request's prebuilt tail around the JSON text) and queued there,
and ``think`` returns. One flusher task writes what is queued: every stream's chunks
since the last round trip, as one run per stream, in one pipelined round trip (one
script call per session, see ``redis.chunks``). A busy worker so pays one round trip
per batch and a few list operations per chunk; a lightly loaded one still sends a chunk
as soon as the agent yields to the event loop.

Bounds (overflow policy: wait). A stream holds at most ``max_queued`` chunks or
``max_queued_bytes`` not yet taken by a round trip; past that, ``put`` (so ``think``)
waits until the flusher takes them. One round trip takes up to ``max_run`` chunks of
each stream (64: a stream's whole queue), up to ``max_batch`` in all: a session's
notification then carries at most ``max_run`` chunks per agent, a burst the gateway's
outbound buffer takes whole when it is empty (``core.outbox``), however small
``MAX_OUTBOUND_MESSAGES``. Runs of 16 cost the worker and Redis more per chunk (see
BENCHMARKS.md).

Guarantees. A stream's chunks are written in order; a round trip that fails (a Redis
outage) puts them back in front of the stream's queue and is retried after a backoff
(a chunk whose reply was lost may be logged twice, as before). A chunk the session
refuses closes its stream: its queue is dropped, and the next ``put`` returns False. The
runner awaits ``drain`` before writing a final, so a final follows its chunks.

Profiling under ``magi-gateway bench relay`` showed the per-chunk round trip (socket
write, wake-up, reply parse) and the per-chunk argument packing as the worker's largest
costs; see BENCHMARKS.md for the measured effect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from magi_gateway._tasks import cancel_and_wait
from magi_gateway._util import Backoff
from magi_gateway.core import frames
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.redis.chunks import ChunkRun
from magi_gateway.redis.store import AppendResult, Store

__all__ = ["ChunkAppender", "ChunkStream"]

logger = logging.getLogger(__name__)

_EMPTY: Mapping[str, Any] = {}


class ChunkStream:
    """One request's thinking chunks on their way to its session's log, in order."""

    __slots__ = (
        "_appender",
        "_idle",
        "_outcome",
        "_prefix",
        "_room",
        "_suffix",
        "agent_id",
        "closed",
        "queued",
        "queued_bytes",
        "session_id",
        "writing",
    )

    def __init__(
        self,
        appender: ChunkAppender,
        session_id: SessionId,
        agent_id: AgentId,
        extra: Mapping[str, Any] = _EMPTY,
        outcome: asyncio.Future[AppendResult] | None = None,
    ) -> None:
        self._appender = appender
        self.session_id = session_id
        self.agent_id = agent_id
        self._prefix, self._suffix = frames.stream_tail_affixes(agent_id, extra)
        #: Encoded tails not yet taken by a round trip, and their size.
        self.queued: list[bytes] = []
        self.queued_bytes = 0
        #: Tails in the round trip in flight.
        self.writing: list[bytes] = []
        #: True once the session refused a chunk (or the runner closed the stream).
        self.closed = False
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        # A single append that reports its own outcome (``ChunkAppender.append``).
        self._outcome = outcome

    async def put(self, text: str) -> bool:
        """Queue one chunk of thinking; False once the session refused this stream's output.

        ``TypeError`` when ``text`` cannot be encoded.
        """
        if self.closed:
            return False
        tail = self._prefix + orjson.dumps(text) + self._suffix
        appender = self._appender
        while len(self.queued) >= appender.max_queued or self.queued_bytes >= appender.max_queued_bytes:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room
            if self.closed:
                return False
        self._enqueue(tail)
        return True

    async def drain(self) -> None:
        """Return once every chunk put so far is written, or refused."""
        while self.queued or self.writing:
            if self._idle is None or self._idle.done():
                self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def close(self) -> None:
        """Drop what is not yet written and refuse further chunks (the request ended)."""
        self.closed = True
        self.queued = []
        self.queued_bytes = 0
        _wake(self._room)
        if not self.writing:
            _wake(self._idle)

    def _enqueue(self, tail: bytes) -> None:
        self.queued.append(tail)
        self.queued_bytes += len(tail)
        self._appender._ready(self)

    def _take(self, count: int) -> list[bytes]:
        """Move up to ``count`` queued chunks into the round trip being prepared; wake a
        ``put`` waiting for room."""
        if len(self.queued) <= count:
            self.writing, self.queued, self.queued_bytes = self.queued, [], 0
        else:
            self.writing, self.queued = self.queued[:count], self.queued[count:]
            self.queued_bytes -= sum(map(len, self.writing))
        _wake(self._room)
        return self.writing

    def _written(self, outcome: list[int] | BaseException) -> bool:
        """Account for the round trip's outcome; True when the chunks must be sent again."""
        tails, self.writing = self.writing, []
        retry = False
        if isinstance(outcome, BaseException):
            if self._outcome is not None:
                if not self._outcome.done():
                    self._outcome.set_exception(outcome)
            elif isinstance(outcome, BackendUnavailable) and not self.closed:
                self.queued[:0] = tails  # in front of what was put meanwhile: order kept
                self.queued_bytes += sum(map(len, tails))
                retry = True
            else:
                # A command Redis refuses (bad data under the session's keys) or a bug:
                # retrying cannot help. The stream closes; the agent's next think raises.
                if isinstance(outcome, BackendCommandError):
                    logger.error("Redis refused chunks of a session: %s", outcome.__cause__)
                self.close()
        else:
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_result(AppendResult(outcome[0] if outcome[0] > 0 else None))
            if min(outcome) < 0:
                self.close()
        if not self.queued:
            _wake(self._idle)
        return retry


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class ChunkAppender:
    """Writes the queued chunks of all streams of a worker, batch after batch."""

    def __init__(
        self,
        store: Store,
        backoff: Backoff | None = None,
        *,
        max_batch: int = 512,
        max_run: int = 64,
        max_queued: int = 64,
        max_queued_bytes: int = 1 << 20,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_run = max_run
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._backoff = backoff if backoff is not None else Backoff(0.05, 5.0)
        #: Streams with queued chunks, oldest first (a dict as an ordered set).
        self._pending: dict[ChunkStream, None] = {}
        self._flusher: asyncio.Task[None] | None = None
        #: Round trips made and chunks written (for tests and benchmarks).
        self.round_trips = 0
        self.chunks = 0

    def stream(
        self, session_id: SessionId, agent_id: AgentId, extra: Mapping[str, Any] = _EMPTY
    ) -> ChunkStream:
        """A stream for one request's chunks; ``extra`` fields go in every chunk's ``data``."""
        return ChunkStream(self, session_id, agent_id, extra)

    async def append(self, session_id: SessionId, agent_id: AgentId, data: dict[str, Any]) -> AppendResult:
        """Append one chunk and wait for it to be in the session log (or refused).

        It shares round trips with everything queued; unlike a stream's chunks, a failed
        round trip raises ``BackendUnavailable`` here instead of being retried. Data that
        cannot be encoded fails this call (``TypeError``), not the batch it would join.
        """
        tail = frames.stream_tail(agent_id, data)
        outcome: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        ChunkStream(self, session_id, agent_id, _EMPTY, outcome)._enqueue(tail)
        return await outcome

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait up to ``timeout_s`` for the queued chunks to be written, then stop."""
        if self._flusher is not None:
            _done, pending = await asyncio.wait({self._flusher}, timeout=timeout_s)
            await cancel_and_wait(pending)

    def _ready(self, stream: ChunkStream) -> None:
        self._pending[stream] = None
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="magi-chunk-appender")

    async def _flush(self) -> None:
        streams: list[ChunkStream] = []
        try:
            while self._pending:
                runs: list[ChunkRun] = []
                streams, count = [], 0
                while self._pending and count < self.max_batch:
                    stream = next(iter(self._pending))
                    del self._pending[stream]
                    if stream.queued:
                        runs.append((stream.session_id, stream.agent_id, stream._take(self.max_run)))
                        streams.append(stream)
                        count += len(runs[-1][2])
                if not runs:
                    continue
                outcomes = await self._append(runs)
                self.round_trips += 1
                failure: BaseException | None = None
                for stream, outcome in zip(streams, outcomes, strict=True):
                    retry = stream._written(outcome)
                    if isinstance(outcome, BaseException):
                        failure = outcome if retry else failure
                    else:
                        self.chunks += len(outcome)
                    if stream.queued:
                        self._pending[stream] = None
                streams = []
                if failure is not None:
                    await asyncio.sleep(self._backoff.failed(logger, "streaming thinking chunks", failure))
                else:
                    self._backoff.reset()
        except asyncio.CancelledError:
            # Stopping: nobody will write what is left; single appends learn it.
            stopping = BackendUnavailable("worker stopping")
            for stream in [*streams, *self._pending]:
                stream.close()
                stream._written(stopping)
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    async def _append(self, runs: Sequence[ChunkRun]) -> list[list[int] | BaseException]:
        try:
            return list(await self.store.chunks.append_runs(runs))
        except BackendUnavailable as exc:
            return [exc] * len(runs)
        except Exception as exc:  # a bug, not an outage: fail the batch loudly, once
            logger.exception("appending a batch of chunks failed")
            return [exc] * len(runs)
