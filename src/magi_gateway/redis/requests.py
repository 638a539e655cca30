"""The worker side of the request streams: consumer groups, reads, takeover, acks, cancels.

Each agent has a request stream (``Keys.requests``) with one consumer group,
``WORKER_GROUP``, that every worker of the agent joins. ``RequestQueue`` issues every
command a worker sends about requests; ``Worker`` (``worker/runner.py``) decides when.
Failures surface as ``BackendUnavailable`` (``redis_errors``).

``Request`` decodes the entries ``Store.enqueue_request`` (the gateway side) writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.client import RedisClient, listen, redis_errors
from magi_gateway.redis.keys import WORKER_GROUP, Keys

__all__ = ["Request", "RequestQueue", "StaleRequest"]


@dataclass(frozen=True, slots=True)
class Request:
    """One judgement request as a worker reads it from an agent's stream."""

    message_id: bytes
    session_id: SessionId
    agent_id: AgentId
    user_input: str
    deadline_ms: int
    appid: AppId

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

    async def ensure_groups(self) -> None:
        """Create the consumer group of every stream (and the stream) unless it exists."""
        for agent_id in self.agent_ids:
            with redis_errors():
                try:
                    await self.redis.xgroup_create(
                        self.keys.requests(agent_id), WORKER_GROUP, id="0", mkstream=True
                    )
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def read_new(self, count: int, stopping: asyncio.Event, block_ms: int) -> list[Request] | None:
        """Up to ``count`` new requests, waiting up to ``block_ms`` for one.

        Returns None when ``stopping`` is set before the read answers: the read is
        cancelled, and entries it may still deliver stay pending (taken over later).
        """
        streams: Any = {self.keys.requests(a): ">" for a in self.agent_ids}
        read = asyncio.ensure_future(
            self.redis.xreadgroup(WORKER_GROUP, self.consumer, streams, count=count, block=block_ms)
        )
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not read.done():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            return None
        with redis_errors():
            reply: Any = read.result()
        return [
            Request.from_fields(message_id, fields)
            for _stream, entries in reply or []
            for message_id, fields in entries
        ]

    async def stale(self, agent_id: AgentId, count: int, idle_ms: int) -> list[StaleRequest]:
        """Up to ``count`` pending requests of ``agent_id`` idle for ``idle_ms`` or more."""
        with redis_errors():
            entries: Any = await self.redis.xpending_range(
                self.keys.requests(agent_id), WORKER_GROUP, min="-", max="+", count=count, idle=idle_ms
            )
        return [StaleRequest(e["message_id"], int(e["times_delivered"])) for e in entries]

    async def claim(self, agent_id: AgentId, message_id: bytes, idle_ms: int) -> Request | None:
        """Take over one stale request; None when another worker was faster or it is gone."""
        with redis_errors():
            claimed: Any = await self.redis.xclaim(
                self.keys.requests(agent_id), WORKER_GROUP, self.consumer, idle_ms, [message_id]
            )
        if not claimed or claimed[0][1] is None:
            return None
        claimed_id, fields = claimed[0]
        return Request.from_fields(claimed_id, fields)

    async def refresh(self, requests: Iterable[Request]) -> None:
        """Reset the idle time of running requests so no other worker takes them over."""
        by_stream: dict[str, list[Any]] = {}
        for request in requests:
            by_stream.setdefault(self.keys.requests(request.agent_id), []).append(request.message_id)
        for stream, ids in by_stream.items():
            with redis_errors():
                # JUSTID: reset idle time without counting a new delivery.
                await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, justid=True)

    async def ack(self, request: Request) -> None:
        """Acknowledge and delete ``request``: it is done, nobody needs it again."""
        await self.finish([request])

    async def finish(self, requests: Iterable[Request], completed: Iterable[SessionId] = ()) -> None:
        """Acknowledge and delete ``requests``, and take the ``completed`` sessions out of
        the deadline sweep, in one round trip (all these keys share the ``{P}`` slot)."""
        by_stream: dict[str, list[bytes]] = {}
        for request in requests:
            by_stream.setdefault(self.keys.requests(request.agent_id), []).append(request.message_id)
        sessions = list(completed)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, WORKER_GROUP, *ids)
                    pipe.xdel(stream, *ids)
                if sessions:
                    pipe.zrem(self.keys.deadlines, *sessions)
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
