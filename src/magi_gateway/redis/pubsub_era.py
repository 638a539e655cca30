"""The original system's pub/sub channels, as ``PubSubBridge`` (``worker/pubsub_bridge.py``) uses them.

Requests are ``PUBLISH``ed on ``PubSubKeys.request_channel``; responses arrive on a
``PSUBSCRIBE`` of ``PubSubKeys.responses_pattern``. Nothing here is stored: what is
published while nobody listens is gone, as it was in the original system. Failures
surface as ``BackendUnavailable`` / ``BackendCommandError`` (``redis_errors``).
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio.client import PubSub

from magi_gateway.core.ids import SessionId
from magi_gateway.redis.client import RedisClient, open_pubsub, redis_errors
from magi_gateway.redis.keys import PubSubKeys

__all__ = ["PubSubChannels"]


class PubSubChannels:
    """Commands on the original request and response channels ``keys``."""

    def __init__(self, redis: RedisClient, keys: PubSubKeys) -> None:
        self.redis = redis
        self.keys = keys

    async def publish_request(self, session_id: SessionId, payload: bytes) -> int:
        """Publish a request; how many subscribers received it (0: no backend listens)."""
        with redis_errors():
            receivers: int = await self.redis.publish(self.keys.request_channel(session_id), payload)
        return receivers

    async def watch_responses(
        self,
        on_message: Callable[[str | None, bytes], None],
        *,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        """Call ``on_message(session named by the channel, data)`` for every response.

        Runs until the subscription fails (``BackendUnavailable``) or it is cancelled;
        ``on_subscribed`` is called once the pattern subscription is in place.
        """
        pubsub: PubSub | None = None
        try:
            with redis_errors():
                pubsub = await open_pubsub(self.redis)
                await pubsub.psubscribe(self.keys.responses_pattern)
                if on_subscribed is not None:
                    on_subscribed()
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    name = channel.decode(errors="replace") if isinstance(channel, bytes) else str(channel)
                    on_message(self.keys.session_of(name), message["data"])
        finally:
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
