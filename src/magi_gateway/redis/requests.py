"""The worker side of the request streams: fair reads, takeover, acks, cancels.

Each agent has one request stream per appid (``Keys.requests``), each with the consumer
group ``WORKER_GROUP`` that every worker of the agent joins, and an index of the appids
that queued requests lately (``Keys.request_apps``). A worker reads the appids *in
turn*: each read round takes an equal share of the worker's free slots (at least one
request) from each appid's stream, starting after the appid served last, until the
slots are filled. So one appid's flood queues behind itself: another appid's request
waits for the next free slot, not for the flood to drain. With nothing to read, the
worker blocks on every known stream at once for a short while (``_IDLE_BLOCK_MS``),
then looks for appids that started queueing meanwhile. ``RequestQueue`` issues every
command a worker sends about requests; ``Worker`` (``worker/runner.py``) decides when.
Failures surface as ``BackendUnavailable`` or ``BackendCommandError`` (``redis_errors``).

``Request`` decodes the entries ``lua/enqueue.lua`` (the gateway side) writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.client import RedisClient, listen, redis_errors
from magi_gateway.redis.keys import WORKER_GROUP, Keys
from magi_gateway.redis.liveness import REQUEST_STREAM_TTL_MS, active_apps

__all__ = ["Request", "RequestQueue", "RequestStream", "StaleRequest"]

#: How often a busy worker looks for appids that started queueing (an idle one: each wait).
_INDEX_REFRESH_S = 0.05
#: An idle worker's blocking read; then it looks for new appids again. It bounds the wait
#: of an appid's first request after a quiet spell, and how soon an idle worker helps a
#: busy one with an appid it did not know: 50 ms (two small commands per wait).
_IDLE_BLOCK_MS = 50


@dataclass(frozen=True, slots=True)
class RequestStream:
    """One agent's request stream for one appid."""

    agent_id: AgentId
    appid: AppId
    key: str


@dataclass(frozen=True, slots=True)
class Request:
    """One judgement request as a worker reads it from an agent's stream."""

    message_id: bytes
    session_id: SessionId
    agent_id: AgentId
    user_input: str
    deadline_ms: int
    appid: AppId
    #: The client frame's other fields, JSON-encoded, b"" when none (``Context.request_fields``).
    extra: bytes = b""

    @classmethod
    def from_fields(cls, message_id: bytes, fields: Mapping[bytes, bytes]) -> Request:
        """Decode the stream entry written by ``Store.enqueue_request``."""
        return cls(
            message_id=message_id,
            session_id=SessionId(fields[b"sid"].decode()),
            agent_id=AgentId(fields[b"agent"].decode()),
            user_input=fields[b"input"].decode(),
            deadline_ms=int(fields[b"deadline_ms"]),
            appid=AppId(fields.get(b"appid", b"").decode()),
            extra=fields.get(b"extra", b""),
        )


@dataclass(frozen=True, slots=True)
class StaleRequest:
    """A pending request nobody refreshed for the idle time asked for."""

    message_id: bytes
    #: Deliveries so far (the first read counts one).
    times_delivered: int


class RequestQueue:
    """The request streams of ``agent_ids``, as consumer ``consumer`` of their group."""

    def __init__(self, redis: RedisClient, keys: Keys, agent_ids: Sequence[AgentId], consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.agent_ids = tuple(agent_ids)
        self.consumer = consumer
        #: Streams whose group this worker made sure of (``ensure_groups`` forgets them).
        self._known: set[str] = set()
        #: The stream a request was last read from: the next round starts after it.
        self._last_served: str | None = None
        #: The streams of the appids active lately (refreshed every ``_INDEX_REFRESH_S``).
        self._streams: list[str] | None = None
        self._streams_at = 0.0

    def stream_of(self, request: Request) -> str:
        """The stream ``request`` was read from."""
        return self.keys.requests(request.agent_id, request.appid)

    async def streams(self) -> list[RequestStream]:
        """The request streams of the appids active lately, for every agent, in a stable order."""
        apps = await active_apps(self.redis, self.keys, self.agent_ids)
        return [
            RequestStream(agent_id, appid, self.keys.requests(agent_id, appid))
            for agent_id in self.agent_ids
            for appid in apps[agent_id]
        ]

    async def ensure_groups(self) -> None:
        """Forget which groups are known: the next read makes sure of each again."""
        self._known.clear()

    async def _ensure(self, streams: Iterable[RequestStream]) -> None:
        """Create the group (and stream, with an expiry) of streams not known yet."""
        for stream in streams:
            if stream.key in self._known:
                continue
            with redis_errors():
                try:
                    await self.redis.xgroup_create(stream.key, WORKER_GROUP, id="0", mkstream=True)
                    await self.redis.pexpire(stream.key, REQUEST_STREAM_TTL_MS, nx=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
            self._known.add(stream.key)

    async def read_new(self, count: int, stopping: asyncio.Event, block_ms: int) -> list[Request] | None:
        """Up to ``count`` new requests, the appids in turn, waiting up to ``block_ms`` for one.

        Returns None when ``stopping`` is set before a blocking read answers (the read is
        cancelled; entries it may still deliver stay pending and are taken over later);
        an empty list when the wait ended without a request.
        """
        if self._streams is None or time.monotonic() - self._streams_at > _INDEX_REFRESH_S:
            await self._refresh_streams()
        requests = await self._read_in_turn(count)
        if requests:
            return requests
        # Idle: look for appids new since, then block on every stream for the first arrival.
        await self._refresh_streams()
        return await self._read_blocking(count, stopping, min(block_ms, _IDLE_BLOCK_MS))

    async def _refresh_streams(self) -> None:
        streams = await self.streams()
        await self._ensure(streams)
        self._streams, self._streams_at = [s.key for s in streams], time.monotonic()

    def _in_turn(self) -> list[str]:
        """The known streams, starting after the one served last."""
        keys = list(self._streams or [])
        if self._last_served in keys:
            after = keys.index(self._last_served) + 1
            keys = keys[after:] + keys[:after]
        return keys

    async def _read_in_turn(self, count: int) -> list[Request]:
        """Rounds of an equal share per stream (at least one), after the stream served last."""
        taken: list[Request] = []
        candidates = self._in_turn()
        while candidates and len(taken) < count:
            batch = candidates[: count - len(taken)]
            got = await self._read(batch, count - len(taken), None)
            served = [key for key in batch if got.get(key)]
            taken += [request for key in served for request in got[key]]
            if served:
                self._last_served = served[-1]
            # Streams that gave some may have more: they come again, after the unread ones.
            candidates = candidates[len(batch) :] + served
        return taken

    async def _read_blocking(
        self, count: int, stopping: asyncio.Event, block_ms: int
    ) -> list[Request] | None:
        """One read blocking up to ``block_ms`` on (up to ``count``) streams, in turn."""
        batch = self._in_turn()[:count]
        if not batch:  # nothing to block on: wait as long, or until stopping
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), block_ms / 1000)
            return None if stopping.is_set() else []
        read = asyncio.ensure_future(self._read(batch, count, block_ms))
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not read.done():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            return None
        got = read.result()
        served = [key for key in batch if got.get(key)]
        if served:
            self._last_served = served[-1]
        return [request for key in served for request in got[key]]

    async def _read(self, batch: list[str], count: int, block_ms: int | None) -> dict[str, list[Request]]:
        """XREADGROUP of ``batch``: an equal share of ``count`` (at least one) from each."""
        share = max(count // len(batch), 1)
        with redis_errors():
            reply: Any = await self.redis.xreadgroup(
                WORKER_GROUP, self.consumer, dict.fromkeys(batch, ">"), count=share, block=block_ms
            )
        return {
            stream: [Request.from_fields(message_id, fields) for message_id, fields in entries]
            for stream, entries in _stream_entries(reply)
        }

    async def stale(self, stream: RequestStream, count: int, idle_ms: int) -> list[StaleRequest]:
        """Up to ``count`` pending requests of ``stream`` idle for ``idle_ms`` or more."""
        with redis_errors():
            try:
                entries: Any = await self.redis.xpending_range(
                    stream.key, WORKER_GROUP, min="-", max="+", count=count, idle=idle_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []  # the stream expired: nothing pending there
        return [StaleRequest(e["message_id"], int(e["times_delivered"])) for e in entries]

    async def claim(self, stream: RequestStream, message_id: bytes, idle_ms: int) -> Request | None:
        """Take over one stale request; None when another worker was faster or it is gone."""
        with redis_errors():
            claimed: Any = await self.redis.xclaim(
                stream.key, WORKER_GROUP, self.consumer, idle_ms, [message_id]
            )
        if not claimed or claimed[0][1] is None:
            return None
        claimed_id, fields = claimed[0]
        return Request.from_fields(claimed_id, fields)

    async def refresh(self, requests: Iterable[Request]) -> None:
        """Reset the idle time of running requests so no other worker takes them over."""
        by_stream: dict[str, list[Any]] = {}
        for request in requests:
            by_stream.setdefault(self.stream_of(request), []).append(request.message_id)
        for stream, ids in by_stream.items():
            with redis_errors():
                # JUSTID: reset idle time without counting a new delivery.
                await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, justid=True)

    async def ack(self, request: Request) -> None:
        """Acknowledge and delete ``request``: it is done, nobody needs it again."""
        await self.finish([request])

    async def finish(self, requests: Iterable[Request], completed: Iterable[Request] = ()) -> None:
        """Acknowledge and delete ``requests``, and take the sessions of the ``completed``
        ones out of the deadline sweep and out of their appid's running sessions, in one
        round trip (all these keys share the ``{P}`` slot)."""
        by_stream: dict[str, list[bytes]] = {}
        for request in requests:
            by_stream.setdefault(self.stream_of(request), []).append(request.message_id)
        sessions = list(completed)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, WORKER_GROUP, *ids)
                    pipe.xdel(stream, *ids)
                if sessions:
                    pipe.zrem(self.keys.deadlines, *(done.session_id for done in sessions))
                for done in sessions:
                    pipe.zrem(self.keys.app_running(done.appid), done.session_id)
                await pipe.execute()

    async def watch_cancels(
        self, on_cancel: Callable[[SessionId], None], *, on_subscribed: Callable[[], None] | None = None
    ) -> None:
        """Call ``on_cancel`` with every session id published on the cancel channel.

        Runs until the subscription fails (``BackendUnavailable``) or it is cancelled;
        ``on_subscribed`` is called once the subscription is in place.
        """
        await listen(
            self.redis,
            [self.keys.cancel_channel],
            lambda _channel, data: on_cancel(SessionId(data.decode())),
            on_subscribed=on_subscribed,
        )


def _stream_entries(reply: Any) -> list[tuple[str, list[Any]]]:
    """``(stream, entries)`` of an XREAD/XREADGROUP reply (RESP2 list or RESP3 map)."""
    items = reply.items() if isinstance(reply, dict) else (reply or [])
    return [(s.decode() if isinstance(s, bytes) else s, entries) for s, entries in items]
