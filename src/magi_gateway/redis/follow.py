"""Reading a session for the ``/v1`` HTTP API: its log after a cursor, waiting for more,
and a snapshot of where it stands.

An event stream follows its session with ``XREAD COUNT n BLOCK ms STREAMS <log> 0-<seq>``:
what is logged after the cursor comes back at once, and when nothing is, Redis holds the
read until a message is appended or ``ms`` passes. One key per command, so a Redis
Cluster routes it to the session's shard. A blocked read holds its connection, so the
streams read on a client of their own (``SSE_MAX_STREAMS`` connections at most, one per
stream), never on the pool that serves judgements and workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.session import compute_verdict
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["LogEntry", "SessionFollower", "Snapshot"]

#: ``(seq, type, frame)`` of one logged message.
LogEntry = tuple[int, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where a session stands: for ``GET /v1/sessions/{id}``."""

    appid: str
    agent_ids: tuple[AgentId, ...]
    pending: tuple[AgentId, ...]
    #: agent -> ``{"result_code": int, "decision"?: str}`` of the finals logged so far.
    finals: dict[str, dict[str, Any]]
    completed: bool
    #: The seq of the last message logged.
    last_seq: int

    @property
    def verdict(self) -> str:
        """The majority of the decisions so far (``abstain`` on a tie); final once completed."""
        return compute_verdict(result.get("decision") for result in self.finals.values())


class SessionFollower:
    """Session reads for event streams, on a client reserved for them."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def read_after(
        self, session_id: SessionId, after_seq: int, *, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        """At most ``count`` messages with ``seq > after_seq``, in order; with ``block_ms``,
        waiting up to that long for the first when there is none yet (then maybe none)."""
        log = self.keys.session(session_id).log
        with redis_errors():
            reply: Any = await self.redis.xread(
                {log: f"0-{after_seq}"}, count=count, block=block_ms if block_ms > 0 else None
            )
        if not reply:
            return []
        # One stream was read: RESP2 answers [[key, entries]], RESP3 {key: [entries]}.
        entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
        return [
            (int(entry_id.split(b"-")[1]), fields.get(b"t", b"other"), fields[b"f"])
            for entry_id, fields in entries
        ]

    async def completed(self, session_id: SessionId) -> bool | None:
        """Whether the session has completed; None when it is unknown or expired."""
        meta = self.keys.session(session_id).meta
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(meta)
                pipe.hexists(meta, "completed")
                exists, completed = await pipe.execute()
        return bool(completed) if exists else None

    async def snapshot(self, session_id: SessionId) -> Snapshot | None:
        """The session's state now, or None when unknown or expired."""
        keys = self.keys.session(session_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta)
                pipe.smembers(keys.pending)
                pipe.hgetall(keys.results)
                pipe.get(keys.seq)
                meta, pending, results, seq = await pipe.execute()
        if not meta:
            return None
        agent_ids = tuple(AgentId(a) for a in orjson.loads(meta[b"agents"]))
        waiting = {member.decode() for member in pending}
        by_agent = {agent.decode(): orjson.loads(summary) for agent, summary in results.items()}
        return Snapshot(
            appid=meta[b"appid"].decode(),
            agent_ids=agent_ids,
            pending=tuple(a for a in agent_ids if a in waiting),
            finals={a: by_agent[a] for a in agent_ids if a in by_agent},
            completed=b"completed" in meta,
            last_seq=int(seq or 0),
        )

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.redis.aclose()
