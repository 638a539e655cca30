"""A session's viewers: the connections, on any gateway instance, that follow it.

The session's ``viewers`` key (a sorted set in its hash slot, ``redis.keys``) holds one entry
``"INSTANCE CONNECTION"`` per viewer, scored by its lease expiry (ms, Redis clock). The
append scripts publish each message once to every instance named there; an instance
registers a connection when it starts following (``join``, refused over the bound,
cluster-wide), renews its viewers' leases (``renew``) and removes a connection that
stops (``leave``). Entries of an instance that died expire with their lease and are
dropped by the next ``join`` or ``renew``: the set stays bounded and dead instances stop
counting. The opening connection is registered by ``Store.create_session`` itself.

A viewer that reads the log itself (a ``/v1`` event stream, ``XREAD BLOCK``) needs no
notification: its entry starts with a space, ``" INSTANCE CONNECTION"`` (``notify=False``).
It counts, expires and is pruned as any other, but names no instance for the append
scripts (they publish to the instance an entry starts with, and an entry that starts with
a space starts with none): no PUBLISH goes to an instance that would only ignore it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from magi_gateway.core.errors import SessionNotFound, TooManyViewers
from magi_gateway.core.ids import ConnectionId, InstanceId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.keys import Keys

__all__ = ["RENEW_BATCH", "Viewers", "viewer_entry"]

_VIEWERS_LUA = files("magi_gateway.redis").joinpath("lua/viewers.lua").read_text(encoding="utf-8")
_GONE, _FULL = -1, -2
#: Renewals sent concurrently (each its own script call; one session's keys per call).
RENEW_BATCH = 64


def viewer_entry(instance_id: InstanceId, connection_id: ConnectionId, *, notify: bool = True) -> str:
    """A viewer's entry in the set (instance ids hold no space); ``notify=False``: an entry
    the append scripts publish nothing for."""
    return f"{instance_id} {connection_id}" if notify else f" {instance_id} {connection_id}"


class Viewers:
    """Registration of the connections following sessions."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(_VIEWERS_LUA)

    async def _call(self, mode: str, session_id: SessionId, entry: str, lease_ms: int, limit: int) -> int:
        keys = self.keys.session(session_id)
        with redis_errors():
            reply: Any = await self._script(
                keys=[keys.meta, keys.viewers], args=[mode, entry, lease_ms, limit]
            )
        return int(reply)

    async def join(
        self,
        session_id: SessionId,
        instance_id: InstanceId,
        connection_id: ConnectionId,
        *,
        max_viewers: int,
        lease_ms: int,
        notify: bool = True,
    ) -> bool:
        """Register a viewer; True if it was not one yet.

        Raises ``TooManyViewers`` when ``max_viewers`` others follow the session, and
        ``SessionNotFound`` when it is gone.
        """
        entry = viewer_entry(instance_id, connection_id, notify=notify)
        reply = await self._call("join", session_id, entry, lease_ms, max_viewers)
        if reply == _FULL:
            raise TooManyViewers(
                f"This session has {max_viewers} viewers already; try again later", session_id=session_id
            )
        if reply == _GONE:
            raise SessionNotFound("Session not found or expired", session_id=session_id)
        return reply == 1

    async def renew(
        self,
        instance_id: InstanceId,
        viewers: Sequence[tuple[SessionId, ConnectionId]],
        lease_ms: int,
        *,
        notify: bool = True,
    ) -> list[int]:
        """Extend the leases of this instance's ``viewers``: one code each, 1 when the
        viewer had been dropped and is registered again (messages may have gone
        unnotified meanwhile), 0 renewed, -1 the session is gone."""
        codes: list[int] = []
        for start in range(0, len(viewers), RENEW_BATCH):
            batch = viewers[start : start + RENEW_BATCH]
            calls = [
                self._call("renew", sid, viewer_entry(instance_id, c, notify=notify), lease_ms, 0)
                for sid, c in batch
            ]
            # Every call ends before this returns, failed or not: none is left running.
            replies = await asyncio.gather(*calls, return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
                codes.append(reply)
        return codes

    async def leave(
        self,
        instance_id: InstanceId,
        viewers: Sequence[tuple[SessionId, ConnectionId]],
        *,
        notify: bool = True,
    ) -> None:
        """Remove this instance's ``viewers`` (connections that stopped following)."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id, connection_id in viewers:
                    entry = viewer_entry(instance_id, connection_id, notify=notify)
                    pipe.zrem(self.keys.session(session_id).viewers, entry)
                await pipe.execute()

    async def entries(self, session_id: SessionId) -> list[tuple[InstanceId, ConnectionId]]:
        """The session's registered viewers (leases not checked; those not notified too)."""
        return [(i, c) for i, c, _ in await self.listed(session_id)]

    async def listed(self, session_id: SessionId) -> list[tuple[InstanceId, ConnectionId, bool]]:
        """The session's registered viewers, each with whether it is notified."""
        with redis_errors():
            members: Any = await self.redis.zrange(self.keys.session(session_id).viewers, 0, -1)
        listed: list[tuple[InstanceId, ConnectionId, bool]] = []
        for member in members:
            entry = member.decode()
            instance, _, connection = entry.lstrip(" ").partition(" ")
            listed.append((InstanceId(instance), ConnectionId(connection), not entry.startswith(" ")))
        return listed
