"""This instance's notification subscription: session messages, admin commands, probes.

One pub/sub connection per process (without redis-py's silent retries, so every
reconnect is seen): on the instance's notification channel, and on the deployment's
admin channel when ``ADMIN_SECRET`` is set. After a reconnect every delivered session
re-reads its log from its cursor, so nothing published meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from magi_gateway._util import Backoff
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable, ProtocolError
from magi_gateway.core.notification import decode_notification
from magi_gateway.redis.client import RedisClient, listen
from magi_gateway.server import metrics
from magi_gateway.server.delivery import Delivery

__all__ = ["Listener"]

logger = logging.getLogger(__name__)


class Listener:
    """Receives this instance's notifications and hands them to delivery."""

    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        delivery: Delivery,
        backoff: Callable[[], Backoff],
        *,
        admin_channel: str | None = None,
        on_admin: Callable[[bytes], None] | None = None,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.delivery = delivery
        self._backoff = backoff
        self.admin_channel = admin_channel
        self._on_admin = on_admin
        #: Set while the subscription is up.
        self.subscribed = asyncio.Event()
        self._probes: dict[bytes, asyncio.Future[None]] = {}

    def expect_probe(self, token: bytes) -> asyncio.Future[None]:
        """A future set when the probe notification carrying ``token`` comes back."""
        probe: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[token] = probe
        return probe

    def forget_probe(self, token: bytes) -> None:
        """Stop waiting for a probe (answered or timed out)."""
        self._probes.pop(token, None)

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        backoff = self._backoff()
        admin = self.admin_channel.encode() if self.admin_channel else None
        channels = [self.channel, *([self.admin_channel] if self.admin_channel else [])]
        while True:
            try:
                await listen(
                    self.redis,
                    channels,
                    lambda channel, data: self._handle(channel, data, admin),
                    on_subscribed=lambda: self._subscribed(backoff),
                )
            except (BackendUnavailable, BackendCommandError) as exc:
                # A refused SUBSCRIBE has no other way on than trying again, with backoff.
                self.subscribed.clear()
                await asyncio.sleep(backoff.failed(logger, "notification subscription", exc))

    def _subscribed(self, backoff: Backoff) -> None:
        if backoff.failures:
            metrics.REDIS_RECONNECTS.inc()
            logger.info("notification subscription restored")
            self.delivery.replay_all()
        backoff.reset()
        self.subscribed.set()

    def _handle(self, channel: bytes, data: bytes, admin: bytes | None) -> None:
        try:
            if admin is not None and channel == admin:
                if self._on_admin is not None:
                    self._on_admin(data)
                return
            notification = decode_notification(data)
            if notification.is_probe:
                probe = self._probes.pop(notification.messages[0].frame, None)
                if probe is not None and not probe.done():
                    probe.set_result(None)
                return
            self.delivery.deliver(notification.session_id, notification.messages)
        except ProtocolError:
            logger.warning("skipped a malformed notification on %r", channel)
        except Exception:
            # A malformed message must not end the listener of every session.
            logger.exception("could not handle a message on %r", channel)
