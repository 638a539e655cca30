"""Queueing a session's requests exactly once, even when the gateway fails half-way.

Opening a judgement writes to two hash slots: the session's keys (``{SID}``) and the
agents' request streams (``{P}``), which no single script or transaction may span on a
Redis Cluster. So the gateway first writes an *intake mark* in the ``{P}`` slot (the
requests to queue, with the session's deadline, in ``Keys.unqueued``, due for repair
in ``Keys.unqueued_due``), then creates the session, then runs ``lua/enqueue.lua``,
which removes the mark and adds the requests in one atomic step. The same first step counts
the session against its appid's limits (``lua/admit.lua``). Whoever removes the
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

from magi_gateway._util import now_ms
from magi_gateway.core.errors import RateLimited, TooManySessions
from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.coalesce import CoalescedPipeline
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.liveness import ACTIVE_APP_MS, REQUEST_STREAM_TTL_MS

__all__ = ["REPAIR_AFTER_MS", "AppLimits", "Intake", "PendingIntake", "RequestClaimed"]

_ENQUEUE_LUA = files("magi_gateway.redis").joinpath("lua/enqueue.lua").read_text(encoding="utf-8")
_ADMIT_LUA = files("magi_gateway.redis").joinpath("lua/admit.lua").read_text(encoding="utf-8")
_TOO_MANY, _TOO_FAST = -1, -2

#: A mark this old is queued by the repair sweep (the opening gateway takes milliseconds;
#: queueing early is harmless, the script queues once whoever runs it).
REPAIR_AFTER_MS = 2000
#: A mark whose session is still missing is looked at again this much later.
_RETRY_MS = 1000


class RequestClaimed(Exception):
    """The admission found the request's ``request_id`` naming another session: nothing
    was written (the client's retry is answered by that session)."""

    def __init__(self, session_id: SessionId) -> None:
        super().__init__(session_id)
        self.session_id = session_id


@dataclass(frozen=True, slots=True)
class AppLimits:
    """Per-appid limits on sessions, across every instance (0: none)."""

    #: Sessions running at once (``MAX_SESSIONS_PER_APP``).
    max_running: int = 0
    #: Sessions opened per second (``MAX_SESSIONS_PER_S_PER_APP``), in one-second windows.
    max_per_s: float = 0


@dataclass(frozen=True, slots=True)
class PendingIntake:
    """The requests of one session, as the intake mark holds them until they are queued."""

    session_id: SessionId
    appid: AppId
    agent_ids: tuple[AgentId, ...]
    user_input: str
    deadline_ms: int
    #: The client frame's other fields, JSON-encoded (``JudgementRequest.forwarded_fields``).
    extra: bytes = b""

    def encode(self) -> bytes:
        """The mark's stored form."""
        mark: dict[str, Any] = {
            "appid": self.appid,
            "agents": list(self.agent_ids),
            "input": self.user_input,
            "deadline_ms": self.deadline_ms,
        }
        if self.extra:
            mark["extra"] = self.extra.decode()
        return orjson.dumps(mark)

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
            data.get("extra", "").encode(),
        )


class Intake:
    """The intake marks and the one script that turns them into queued requests."""

    def __init__(self, redis: RedisClient, keys: Keys, *, request_stream_maxlen: int) -> None:
        self.redis = redis
        self.keys = keys
        self.request_stream_maxlen = request_stream_maxlen
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        self._admit = redis.register_script(_ADMIT_LUA)
        #: The openings' round trips (``redis.opening``), shared by concurrent judgements.
        self.openings = CoalescedPipeline(redis)

    def admit_call(
        self,
        session_id: SessionId,
        appid: AppId,
        deadline_ms: int,
        ttl_ms: int,
        intake: PendingIntake | None,
        limits: AppLimits,
        claim: tuple[str, int] | None = None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the admit script (``admit``; ``Store.create_session`` pipelines it
        on one server). ``claim``: a ``request_id`` and how long it names the session, bound
        in the same step (one server only: its key is in another slot; ``RequestClaimed``
        when it names another session already)."""
        now = now_ms()
        keys = [
            self.keys.deadlines,
            self.keys.app_running(appid),
            self.keys.app_rate(appid),
            self.keys.unqueued,
            self.keys.unqueued_due,
        ]
        args: list[Any] = [
            session_id,
            deadline_ms,
            ttl_ms,
            limits.max_running,
            limits.max_per_s,
            now,
            intake.encode() if intake is not None else b"",
            now + REPAIR_AFTER_MS,
        ]
        if claim is not None:
            request_id, claim_ttl_ms = claim
            keys.append(self.keys.idempotency(appid, request_id))
            args.append(claim_ttl_ms)
        return keys, args

    @property
    def admit_sha(self) -> str:
        """The admit script's SHA1 (for ``EVALSHA`` in a pipeline)."""
        sha: str = self._admit.sha
        return sha

    @staticmethod
    def check_admitted(reply: Any, limits: AppLimits) -> None:
        """Raise ``TooManySessions``, ``RateLimited`` or ``RequestClaimed`` for the admit
        script's refusals."""
        if isinstance(reply, bytes):
            raise RequestClaimed(SessionId(reply.decode()))
        code = int(reply)
        if code == _TOO_MANY:
            raise TooManySessions(f"This appid has {limits.max_running} sessions running; try again later")
        if code == _TOO_FAST:
            raise RateLimited(
                f"This appid opens more than {limits.max_per_s:g} sessions per second; slow down"
            )

    async def admit(
        self,
        session_id: SessionId,
        appid: AppId,
        deadline_ms: int,
        ttl_ms: int,
        intake: PendingIntake | None,
        limits: AppLimits,
    ) -> None:
        """Count the session against its appid's limits, record its deadline and ``intake``.

        Raises ``TooManySessions`` or ``RateLimited`` (and records nothing) over a limit.
        """
        keys, args = self.admit_call(session_id, appid, deadline_ms, ttl_ms, intake, limits)
        self.check_admitted(await self.run_admit(keys, args), limits)

    async def run_admit(self, keys: list[str], args: list[Any]) -> Any:
        """Run the admit script with ``admit_call``'s KEYS and ARGV: its reply (``check_admitted``)."""
        with redis_errors():
            return await self._admit(keys=keys, args=args)

    def enqueue_call(self, intake: PendingIntake, *, marked: bool = True) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the enqueue script for ``intake`` (``enqueue``; ``Store.create_session``
        pipelines it with the session's creation on one server)."""
        keys = [self.keys.unqueued, self.keys.unqueued_due]
        for agent_id in intake.agent_ids:
            keys += [
                self.keys.requests(agent_id, intake.appid),
                self.keys.request_apps(agent_id),
            ]
        args: list[Any] = [
            intake.session_id,
            self.request_stream_maxlen,
            REQUEST_STREAM_TTL_MS,
            intake.appid,
            intake.user_input,
            intake.deadline_ms,
            now_ms(),
            ACTIVE_APP_MS,
            "1" if marked else "0",
            intake.extra,
            *intake.agent_ids,
        ]
        return keys, args

    @property
    def enqueue_sha(self) -> str:
        """The enqueue script's SHA1 (for ``EVALSHA`` in a pipeline)."""
        sha: str = self._enqueue.sha
        return sha

    async def enqueue(self, intake: PendingIntake, *, marked: bool = True) -> bool:
        """Queue the marked requests unless someone did; True when this call queued them.

        ``marked=False`` queues them whether or not a mark is there (no mark is removed).
        """
        keys, args = self.enqueue_call(intake, marked=marked)
        with redis_errors():
            done = await self._enqueue(keys=keys, args=args)
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
