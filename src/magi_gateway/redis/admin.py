"""The transport of ``magi-gateway admin`` commands: publish, then collect the answers;
and the deployment-wide record of the commands' nonces.

The command line signs commands (``core/admin.py``) and prints the answers; this module
only moves bytes. Failures surface as ``BackendUnavailable`` (``redis_errors``).
"""

from __future__ import annotations

import time
from importlib.resources import files

from magi_gateway.redis.client import RedisClient, open_pubsub, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["AdminNonces", "publish_and_collect"]

_NONCE_LUA = files("magi_gateway.redis").joinpath("lua/admin_nonce.lua").read_text(encoding="utf-8")


class AdminNonces:
    """When each admin command's nonce was first seen by any gateway instance.

    A command's publication reaches every instance within milliseconds; a nonce first
    seen long before is a replay, even to an instance started since (whose in-memory
    table of seen nonces is empty).
    """

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.keys = keys
        self._record = redis.register_script(_NONCE_LUA)

    async def age_ms(self, nonce: str, ttl_ms: int) -> int:
        """Milliseconds since ``nonce`` was first seen (0: now), kept for ``ttl_ms``; by Redis's clock."""
        with redis_errors():
            age = await self._record(keys=[self.keys.admin_nonce(nonce)], args=[ttl_ms])
        return int(age)


async def publish_and_collect(
    redis: RedisClient, channel: str, payload: bytes, reply_channel: str, wait_s: float
) -> list[bytes]:
    """Publish ``payload`` on ``channel``; return what arrives on ``reply_channel`` within ``wait_s``.

    The reply channel is subscribed before publishing, so no early answer is missed.
    """
    replies: list[bytes] = []
    with redis_errors():
        pubsub = await open_pubsub(redis)
        await pubsub.subscribe(reply_channel)
        try:
            await redis.publish(channel, payload)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                message = await pubsub.get_message(timeout=left)
                if message is not None:
                    replies.append(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
    return replies
