"""Publications that carry no session message: cancels, readiness probes, admin answers.

Session messages are published by the append scripts (``lua/``), with the message;
these are the other publications, one command each.
"""

from __future__ import annotations

from magi_gateway.core.ids import InstanceId, SessionId
from magi_gateway.core.notification import probe_notification
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["Signals"]

#: The readiness key expires by itself.
_PROBE_TTL_MS = 5000


class Signals:
    """Publishing to workers and gateway instances."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def announce_cancel(self, session_id: SessionId) -> None:
        """Tell every worker to stop its agents working on ``session_id``."""
        with redis_errors():
            await self.redis.publish(self.keys.cancel_channel, session_id)

    async def probe(self, instance_id: InstanceId, token: bytes) -> None:
        """Prove Redis takes writes, and send a probe through ``instance_id``'s notifications."""
        with redis_errors():
            await self.redis.set(self.keys.ready_probe(instance_id), token, px=_PROBE_TTL_MS)
            await self.redis.publish(self.keys.gateway_channel(instance_id), probe_notification(token))

    async def answer_admin(self, reply_to: str, answer: bytes) -> None:
        """Publish an instance's answer to an admin command on its reply channel."""
        with redis_errors():
            await self.redis.publish(reply_to, answer)
