"""Worker liveness and agent queues: who serves which agent, and how far behind it is.

Workers heartbeat their agents into ``{P}:a:AGENT:workers`` and ``{P}:agents`` (scores
are expiry times), and the aliases their agents declare into ``{P}:aliases`` (each with
its expiry); gateways read them to answer ``get_agents``, to fail requests for
agents nobody serves at once, and for the queue gauges of ``/metrics``. ``Store``
holds one (``store.liveness``), so callers keep one object per Redis client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import ResponseError

from magi_gateway._util import now_ms
from magi_gateway.core.errors import BackendCommandError
from magi_gateway.core.ids import AgentId, AppId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import WORKER_GROUP, Keys

__all__ = ["ACTIVE_APP_MS", "REQUEST_STREAM_TTL_MS", "AgentStats", "Liveness", "active_apps"]

#: A request stream nobody writes to or serves for a day expires (with its group).
REQUEST_STREAM_TTL_MS = 24 * 3600 * 1000
#: Workers read (and take over from) the streams of appids that queued a request for
#: the agent this recently; longer than any sane judgement timeout.
ACTIVE_APP_MS = 3600 * 1000


async def active_apps(
    redis: RedisClient, keys: Keys, agent_ids: Sequence[AgentId]
) -> dict[AgentId, list[AppId]]:
    """The appids with requests for each agent lately (``ACTIVE_APP_MS``), in a stable order."""
    since = now_ms() - ACTIVE_APP_MS
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            for agent_id in agent_ids:
                pipe.zrangebyscore(keys.request_apps(agent_id), since, "+inf")
            replies: list[Any] = await pipe.execute()
    return {
        agent_id: sorted(AppId(a.decode()) for a in apps)
        for agent_id, apps in zip(agent_ids, replies, strict=True)
    }


@dataclass(frozen=True, slots=True)
class AgentStats:
    """An agent's queue as Redis sees it."""

    workers: int
    #: Requests not yet read by any worker.
    lag: int
    #: Requests read by a worker and not yet acknowledged.
    pending: int


class Liveness:
    """Heartbeats, live workers and agent queue statistics."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def heartbeat(
        self,
        worker_id: str,
        agent_ids: Sequence[AgentId],
        ttl_ms: int,
        aliases: Mapping[str, AgentId] | None = None,
    ) -> None:
        """Mark ``worker_id`` alive for ``agent_ids`` for the next ``ttl_ms``, and the
        ``aliases`` of its agents (alias to agent) valid as long."""
        now = now_ms()
        expires = now + ttl_ms
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                if aliases:
                    declared = {
                        a: orjson.dumps({"agent": t, "expires_ms": expires}) for a, t in aliases.items()
                    }
                    pipe.hset(self.keys.agent_aliases, mapping=declared)  # type: ignore[arg-type]
                    self._extend_expiry(pipe, self.keys.agent_aliases, ttl_ms * 3)
                for agent_id in agent_ids:
                    workers = self.keys.workers(agent_id)
                    pipe.zadd(workers, {worker_id: expires})
                    pipe.zremrangebyscore(workers, "-inf", now)
                    self._extend_expiry(pipe, workers, ttl_ms * 3)
                    pipe.zadd(self.keys.agents, {agent_id: expires}, gt=True)
                    # An agent's index of appids lives as long as someone serves or asks it.
                    pipe.pexpire(self.keys.request_apps(agent_id), REQUEST_STREAM_TTL_MS)
                pipe.zremrangebyscore(self.keys.agents, "-inf", now)
                self._extend_expiry(pipe, self.keys.agents, ttl_ms * 3)
                await pipe.execute()

    @staticmethod
    def _extend_expiry(pipe: Pipeline | ClusterPipeline, key: str, ttl_ms: int) -> None:
        # Shared keys: a worker with a short TTL must not cut another worker's longer one.
        # NX gives a fresh key its first expiry; GT only ever pushes an expiry later.
        pipe.pexpire(key, ttl_ms, nx=True)
        pipe.pexpire(key, ttl_ms, gt=True)

    async def retire_worker(self, worker_id: str, agent_ids: Sequence[AgentId]) -> None:
        """Remove a stopping worker from the live sets at once."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for agent_id in agent_ids:
                    pipe.zrem(self.keys.workers(agent_id), worker_id)
                await pipe.execute()

    async def live_worker_counts(self, agent_ids: Sequence[AgentId]) -> dict[AgentId, int]:
        """Number of live workers for each agent."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                self.queue_counts(pipe, agent_ids)
                return self.counts(agent_ids, await pipe.execute())

    def queue_counts(self, pipe: Pipeline | ClusterPipeline, agent_ids: Sequence[AgentId]) -> None:
        """Queue ``live_worker_counts``' commands on ``pipe`` (its answer: ``counts``)."""
        now = now_ms()
        for agent_id in agent_ids:
            pipe.zcount(self.keys.workers(agent_id), now, "+inf")

    @staticmethod
    def counts(agent_ids: Sequence[AgentId], replies: Sequence[Any]) -> dict[AgentId, int]:
        """The live worker counts, from the last ``len(agent_ids)`` of ``replies``."""
        tail = replies[len(replies) - len(agent_ids) :]
        return dict(zip(agent_ids, (int(c) for c in tail), strict=True))

    def queue_aliases(self, pipe: Pipeline | ClusterPipeline, agent_ids: Sequence[AgentId]) -> None:
        """Queue the lookup of the aliases declared for ``agent_ids`` (its answer: ``aliases``)."""
        pipe.hmget(self.keys.agent_aliases, list(agent_ids))

    @staticmethod
    def aliases(agent_ids: Sequence[AgentId], reply: Sequence[bytes | None]) -> dict[str, AgentId]:
        """The unexpired aliases among ``agent_ids``, from the reply of ``queue_aliases``."""
        return _unexpired(zip(agent_ids, reply, strict=True))

    async def declared_aliases(self) -> dict[str, AgentId]:
        """Every unexpired alias workers declare, alias to agent."""
        with redis_errors():
            declared: Any = await self.redis.hgetall(self.keys.agent_aliases)
        return _unexpired((alias.decode(), value) for alias, value in declared.items())

    async def agent_stats(self) -> dict[AgentId, AgentStats]:
        """Queue state of every agent with a live worker (``XINFO GROUPS`` of its stream)."""
        live = await self.live_agents()
        apps = await active_apps(self.redis, self.keys, list(live))
        stats: dict[AgentId, AgentStats] = {}
        for agent_id, workers in live.items():
            lag = pending = 0
            for appid in apps[agent_id]:
                stream_lag, stream_pending = await self._stream_stats(self.keys.requests(agent_id, appid))
                lag, pending = lag + stream_lag, pending + stream_pending
            stats[agent_id] = AgentStats(workers=workers, lag=lag, pending=pending)
        return stats

    async def _stream_stats(self, stream: str) -> tuple[int, int]:
        """(lag, pending) of one request stream's worker group."""
        try:
            with redis_errors():
                groups: Any = await self.redis.xinfo_groups(stream)
        except BackendCommandError as exc:
            if not (isinstance(exc.__cause__, ResponseError) and "no such key" in str(exc.__cause__)):
                raise
            return 0, 0  # no stream (any more): nothing queued
        for group in groups:
            if group["name"] == WORKER_GROUP.encode():
                pending = int(group["pending"])
                if group.get("lag") is not None:
                    return int(group["lag"]), pending
                # Not computable after some deletions: what is left is pending or new.
                with redis_errors():
                    return max(int(await self.redis.xlen(stream)) - pending, 0), pending
        return 0, 0

    async def live_agents(self) -> dict[AgentId, int]:
        """Agents with at least one live worker, and how many."""
        with redis_errors():
            names: Any = await self.redis.zrangebyscore(self.keys.agents, now_ms(), "+inf")
        counts = await self.live_worker_counts([AgentId(n.decode()) for n in names])
        return {agent: n for agent, n in sorted(counts.items()) if n > 0}


def _unexpired(declared: Any) -> dict[str, AgentId]:
    """``(alias, stored value)`` pairs as alias to agent, the expired and unknown left out."""
    now = now_ms()
    found: dict[str, AgentId] = {}
    for alias, value in declared:
        if value is None:
            continue
        entry = orjson.loads(value)
        if entry.get("expires_ms", 0) > now:
            found[alias] = AgentId(entry["agent"])
    return found
