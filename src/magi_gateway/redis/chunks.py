"""Thinking chunks into session logs, many per round trip (``lua/append_chunks.lua``).

A *run* is consecutive chunks of one agent in one session, as encoded tails
(``core.frames``). The runs of one session go in one script call (one notification, one
refresh of expiries for all of them), its tails joined into one argument so the client
library packs two arguments per run, not per chunk; the calls for several sessions share
a pipeline (``redis.coalesce.call_scripts``; on a Redis Cluster, whose pipelines refuse
scripts, they run concurrently).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from magi_gateway.core import frames
from magi_gateway.core.errors import BackendUnavailable, GatewayError
from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.notification import notify_prefix
from magi_gateway.redis.client import RedisClient
from magi_gateway.redis.coalesce import ScriptCall, call_scripts
from magi_gateway.redis.keys import Keys

__all__ = ["ChunkRun", "ChunkWriter"]

_APPEND_CHUNKS_LUA = files("magi_gateway.redis").joinpath("lua/append_chunks.lua").read_text(encoding="utf-8")

#: ``(session, agent, tails)``: chunks of one agent, in order.
ChunkRun = tuple[SessionId, AgentId, Sequence[bytes]]


class ChunkWriter:
    """Appends runs of chunks; one outcome per run (its chunks' codes, or the failure)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(_APPEND_CHUNKS_LUA)

    async def append_runs(self, runs: Sequence[ChunkRun]) -> list[list[int] | GatewayError]:
        """Append ``runs`` in one round trip, in order.

        Each outcome is one code per chunk of its run: the chunk's seq, or negative when
        the session refused it (gone, completed, agent not pending, log full); or the
        ``BackendUnavailable`` that failed the run's session (retried), or the
        ``BackendCommandError`` of a command Redis refuses (never retried: retrying cannot
        cure bad data under the session's keys). (When the connection drops
        mid-pipeline nobody knows which appends ran: all fail, and a retry may log some
        twice, as a single chunk whose reply was lost.)
        """
        by_session: dict[SessionId, list[int]] = {}
        for index, run in enumerate(runs):
            by_session.setdefault(run[0], []).append(index)
        calls = [self._call(sid, [runs[i] for i in indexes]) for sid, indexes in by_session.items()]
        replies = await call_scripts(self.redis, self._script, calls)
        outcomes: list[list[int] | GatewayError] = [BackendUnavailable("not appended")] * len(runs)
        for indexes, reply in zip(by_session.values(), replies, strict=True):
            start = 0
            for index in indexes:
                end = start + len(runs[index][2])
                outcomes[index] = reply if isinstance(reply, GatewayError) else reply[start:end]
                start = end
        return outcomes

    def _call(self, session_id: SessionId, runs: Sequence[ChunkRun]) -> ScriptCall:
        """KEYS and ARGV of ``lua/append_chunks.lua``."""
        args: list[Any] = [
            frames.session_head("agent_judgement_stream", session_id),
            self.keys.gateway_channel_prefix,
            notify_prefix(session_id),
        ]
        for _sid, agent_id, tails in runs:
            args += (agent_id, b"\n".join(tails))
        return ScriptCall(self.keys.session(session_id).all(), args)
