"""The transport of ``magi-gateway admin`` commands: publish, then collect the answers.

The command line signs commands (``core/admin.py``) and prints the answers; this module
only moves bytes. Failures surface as ``BackendUnavailable`` (``redis_errors``).
"""

from __future__ import annotations

import time

from magi_gateway.redis.client import RedisClient, open_pubsub, redis_errors

__all__ = ["publish_and_collect"]


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
            await pubsub.aclose()  # type: ignore[no-untyped-call]
    return replies
