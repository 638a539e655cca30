"""Queueing a session's requests exactly once, even when the gateway fails half-way.

Opening a judgement writes to two hash slots: the session's keys (``{SID}``) and the
agents' request streams (``{P}``), which no single script or transaction may span on a
Redis Cluster. So the gateway first writes an *intake mark* in the ``{P}`` slot (the
requests to queue, with the session's deadline, in ``Keys.unqueued``, due for repair
in ``Keys.unqueued_due``), then creates the session, then runs ``lua/enqueue.lua``,
which removes the mark and adds the requests in one atomic step. Whoever removes the
mark queues the requests: the gateway that opened the session, or, if it failed or
died between the steps, any instance's repair sweep (``repair``), once the mark is
``REPAIR_AFTER_MS`` old. Requests are therefore queued once, never zero times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from magi_gateway._util import now_ms
from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.liveness import REQUEST_STREAM_TTL_MS

__all__ = ["REPAIR_AFTER_MS", "Intake", "PendingIntake"]

_ENQUEUE_LUA = files("magi_gateway.redis").joinpath("lua/enqueue.lua").read_text(encoding="utf-8")

#: A mark this old is queued by the repair sweep (the opening gateway takes milliseconds;
#: queueing early is harmless, the script queues once whoever runs it).
REPAIR_AFTER_MS = 2000
#: A mark whose session is still missing is looked at again this much later.
_RETRY_MS = 1000


@dataclass(frozen=True, slots=True)
class PendingIntake:
    """The requests of one session, as the intake mark holds them until they are queued."""

    session_id: SessionId
    appid: AppId
    agent_ids: tuple[AgentId, ...]
    user_input: str
    deadline_ms: int

    def encode(self) -> bytes:
        """The mark's stored form."""
        return orjson.dumps(
            {
                "appid": self.appid,
                "agents": list(self.agent_ids),
                "input": self.user_input,
                "deadline_ms": self.deadline_ms,
            }
        )

    @classmethod
    def decode(cls, session_id: SessionId, raw: bytes) -> PendingIntake:
        """Read a mark written by ``encode``."""
        data = orjson.loads(raw)
        return cls(
            session_id,
            AppId(data["appid"]),
            tuple(AgentId(a) for a in data["agents"]),
            data["input"],
            int(data["deadline_ms"]),
        )


class Intake:
    """The intake marks and the one script that turns them into queued requests."""

    def __init__(self, redis: RedisClient, keys: Keys, *, request_stream_maxlen: int) -> None:
        self.redis = redis
        self.keys = keys
        self.request_stream_maxlen = request_stream_maxlen
        self._enqueue = redis.register_script(_ENQUEUE_LUA)

    def mark(self, pipe: Pipeline | ClusterPipeline, intake: PendingIntake, ttl_ms: int) -> None:
        """Add to ``pipe`` the commands recording the requests to queue (before the session exists)."""
        pipe.hset(self.keys.unqueued, intake.session_id, intake.encode())
        pipe.zadd(self.keys.unqueued_due, {intake.session_id: now_ms() + REPAIR_AFTER_MS})
        for key in (self.keys.unqueued, self.keys.unqueued_due):
            pipe.pexpire(key, ttl_ms, nx=True)
            pipe.pexpire(key, ttl_ms, gt=True)

    async def enqueue(self, intake: PendingIntake) -> bool:
        """Queue the marked requests unless someone did; True when this call queued them."""
        streams = [self.keys.requests(agent_id) for agent_id in intake.agent_ids]
        args: list[Any] = [
            intake.session_id,
            self.request_stream_maxlen,
            REQUEST_STREAM_TTL_MS,
            intake.appid,
            intake.user_input,
            intake.deadline_ms,
            *intake.agent_ids,
        ]
        with redis_errors():
            done = await self._enqueue(keys=[self.keys.unqueued, self.keys.unqueued_due, *streams], args=args)
        return bool(done)

    async def due(self, now: int, limit: int = 100) -> list[PendingIntake]:
        """Marks old enough for the repair sweep, oldest first."""
        with redis_errors():
            ids: Any = await self.redis.zrangebyscore(self.keys.unqueued_due, "-inf", now, start=0, num=limit)
            if not ids:
                return []
            raws: Any = await self.redis.hmget(self.keys.unqueued, ids)
        found = [
            PendingIntake.decode(SessionId(i.decode()), raw) for i, raw in zip(ids, raws, strict=True) if raw
        ]
        if len(found) < len(ids):
            # A due entry without its mark: queued meanwhile (the script removes both).
            with redis_errors():
                await self.redis.zrem(
                    self.keys.unqueued_due, *(i for i, raw in zip(ids, raws, strict=True) if not raw)
                )
        return found

    async def postpone(self, session_id: SessionId, now: int) -> None:
        """Look at a mark again later (its session is not created yet)."""
        with redis_errors():
            await self.redis.zadd(self.keys.unqueued_due, {session_id: now + _RETRY_MS}, xx=True)

    async def drop(self, session_ids: Sequence[SessionId]) -> None:
        """Forget marks whose requests must not be queued (session gone, done or past its deadline)."""
        if not session_ids:
            return
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.keys.unqueued, *session_ids)
                pipe.zrem(self.keys.unqueued_due, *session_ids)
                await pipe.execute()
