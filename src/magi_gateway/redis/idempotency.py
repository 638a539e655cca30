"""Idempotency of judgements: a client's ``request_id`` names the session it started.

A retried ``agent_judgement`` with the same ``request_id`` (same appid, within the
session's lifetime) is the same request: the gateway attaches the client to the first
session instead of starting another. Keys: ``Keys.idempotency`` (appid length-prefixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from magi_gateway.core.ids import AppId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["RequestIds"]


class RequestIds:
    """``request_id`` → session bindings, each with an expiry."""

    def __init__(self, redis: RedisClient, keys: Keys, *, retention_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_ms = retention_ms

    async def claim(
        self, appid: AppId, request_id: str, session_id: SessionId, ttl_ms: int
    ) -> SessionId | None:
        """Bind ``request_id`` to ``session_id``; return the session it already names."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                self.queue_claim(pipe, appid, request_id, session_id, ttl_ms)
                return self.claimed(await pipe.execute())

    def queue_claim(
        self,
        pipe: Pipeline | ClusterPipeline,
        appid: AppId,
        request_id: str,
        session_id: SessionId,
        ttl_ms: int,
    ) -> None:
        """Queue ``claim``'s two commands on ``pipe`` (its answer: ``claimed``)."""
        key = self.keys.idempotency(appid, request_id)
        pipe.set(key, session_id, nx=True, px=ttl_ms)
        pipe.get(key)

    @staticmethod
    def claimed(replies: Sequence[Any]) -> SessionId | None:
        """The session ``request_id`` named already, from the first two of ``replies``."""
        bound, existing = replies[0], replies[1]
        return None if bound or not existing else SessionId(existing.decode())

    async def rebind(self, appid: AppId, request_id: str, session_id: SessionId, expired: SessionId) -> None:
        """Point ``request_id`` at a new session once the one it named has expired."""
        key = self.keys.idempotency(appid, request_id)
        with redis_errors():
            current: Any = await self.redis.get(key)
            if current is None or current.decode() == expired:
                await self.redis.set(key, session_id, px=self.retention_ms)

    async def release(self, appid: AppId, request_id: str, session_id: SessionId) -> None:
        """Undo ``claim`` for a session that could not be created."""
        key = self.keys.idempotency(appid, request_id)
        with redis_errors():
            current: Any = await self.redis.get(key)
            if current is not None and current.decode() == session_id:
                await self.redis.delete(key)
