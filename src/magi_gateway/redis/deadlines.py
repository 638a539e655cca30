"""The shared deadline set, swept by every gateway instance, and each appid's running sessions.

A session is in the deadline set (scored by its deadline) from its creation until it
completes or is timed out; the same sessions, per appid, make ``MAX_SESSIONS_PER_APP``
(``redis.intake``). Both leave together, here.
"""

from __future__ import annotations

from typing import Any

from magi_gateway.core.ids import AppId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["Deadlines"]


class Deadlines:
    """Sessions by deadline, across every gateway instance."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def running(self) -> int:
        """Sessions not yet completed or timed out, across every gateway instance."""
        with redis_errors():
            return int(await self.redis.zcard(self.keys.deadlines))

    async def due(self, now: int, limit: int = 100) -> list[SessionId]:
        """Sessions whose deadline has passed and that are not yet cleared."""
        with redis_errors():
            due: Any = await self.redis.zrangebyscore(self.keys.deadlines, "-inf", now, start=0, num=limit)
        return [SessionId(d.decode()) for d in due]

    def stop_running_command(self, appid: AppId, session_id: SessionId) -> tuple[tuple[Any, ...]]:
        """The command that stops counting a session among its appid's running sessions,
        for the round trip that completes it (``redis.coalesce``: best effort; ``clear``
        does it again, and the running set forgets a session at its deadline anyway)."""
        return (("ZREM", self.keys.app_running(appid), session_id),)

    async def clear(self, session_id: SessionId, appid: AppId | None = None) -> None:
        """Remove a session from the deadline sweep and from its appid's running sessions
        (``appid``: when the caller knows it, else read from the session's data)."""
        with redis_errors():
            if appid is not None:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(self.keys.deadlines, session_id)
                    pipe.zrem(self.keys.app_running(appid), session_id)
                    await pipe.execute()
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.deadlines, session_id)
                pipe.hget(self.keys.session(session_id).meta, "appid")
                # Unreadable session data must not keep the session in the sweep forever.
                _removed, found = await pipe.execute(raise_on_error=False)
            if isinstance(found, bytes):  # else it stops counting at its deadline (pruned by score)
                await self.redis.zrem(self.keys.app_running(AppId(found.decode())), session_id)
