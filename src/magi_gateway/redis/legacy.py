"""The original system's Redis lists, as ``LegacyBridge`` (``worker/legacy.py``) uses them.

Backends use one end of each list, the bridge the other (``backend_left``), so both
sides are FIFO. Responses move atomically into a processing list (``lua/legacy_move.lua``),
finals tagged with ``FINAL_TAG`` and only while no chunk waits; one bridge at a time
moves them, the holder of a lease (``lua/legacy_lease.lua``). Failures surface as
``BackendUnavailable`` (``redis_errors``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import LegacyKeys
from magi_gateway.redis.liveness import REQUEST_STREAM_TTL_MS

__all__ = ["FINAL_TAG", "LegacyLists"]

#: Marks finals in the processing list. 0xFF occurs in no UTF-8 text, so no JSON starts with it.
FINAL_TAG = b"\xff"


def _lua(name: str) -> str:
    return (resources.files("magi_gateway.redis") / "lua" / name).read_text(encoding="utf-8")


class LegacyLists:
    """Commands on the legacy lists ``lists``; ``backend_left``: the backends push/pop on the left."""

    def __init__(self, redis: RedisClient, lists: LegacyKeys, *, backend_left: bool) -> None:
        self.redis = redis
        self.lists = lists
        self.backend_left = backend_left
        self._move = redis.register_script(_lua("legacy_move.lua"))
        self._lease = redis.register_script(_lua("legacy_lease.lua"))

    async def push_request(self, payload: bytes) -> None:
        """Queue a request at the end the backends do not pop from; refresh the list's expiry."""
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                if self.backend_left:
                    pipe.rpush(self.lists.requests, payload)
                else:
                    pipe.lpush(self.lists.requests, payload)
                pipe.pexpire(self.lists.requests, REQUEST_STREAM_TTL_MS)
                await pipe.execute()

    async def hold_lease(self, holder: str, ttl_ms: int) -> bool:
        """Take or renew the relay lease for ``ttl_ms``; False while another holder has it."""
        with redis_errors():
            return bool(await self._lease(keys=[self.lists.lease], args=[holder, ttl_ms]))

    async def release_lease(self, holder: str) -> None:
        """Give up the lease if ``holder`` has it."""
        with redis_errors():
            await self._lease(keys=[self.lists.lease], args=[holder, 0])

    async def move_batch(self, count: int) -> int:
        """Move up to ``count`` responses, oldest first, into the processing list; how many."""
        with redis_errors():
            moved: int = await self._move(
                keys=[self.lists.stream_responses, self.lists.final_responses, self.lists.processing],
                args=["RPOP" if self.backend_left else "LPOP", count, REQUEST_STREAM_TTL_MS, FINAL_TAG],
            )
        return moved

    async def wait_for_chunk(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a chunk and move it to the processing list; True if one came."""
        with redis_errors():
            moved = await self.redis.blmove(
                self.lists.stream_responses,
                self.lists.processing,
                timeout_s,  # type: ignore[arg-type]  # Redis 6+ takes fractional seconds
                "RIGHT" if self.backend_left else "LEFT",
                "LEFT",
            )
            if moved is not None:
                await self.redis.pexpire(self.lists.processing, REQUEST_STREAM_TTL_MS)
        return moved is not None

    async def oldest_processing(self, count: int) -> list[bytes]:
        """Up to ``count`` entries of the processing list, newest first (its right end last)."""
        with redis_errors():
            entries: Any = await self.redis.lrange(self.lists.processing, -count, -1)
        return list(entries)

    async def pop_processing(self) -> None:
        """Remove the oldest entry of the processing list (only the lease holder pops)."""
        with redis_errors():
            await self.redis.rpop(self.lists.processing)
