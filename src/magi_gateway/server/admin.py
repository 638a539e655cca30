"""Execution of signed admin commands on this instance's connections (see ``core.admin``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import orjson

from magi_gateway._util import now_ms
from magi_gateway.core import frames
from magi_gateway.core.admin import MAX_AGE_MS, AdminCommand, AdminError, CommandChecker
from magi_gateway.core.errors import CLOSE_ADMIN_DISCONNECT, BackendUnavailable
from magi_gateway.core.ids import InstanceId
from magi_gateway.redis.admin import AdminNonces
from magi_gateway.redis.store import Store
from magi_gateway.server.delivery import Delivery
from magi_gateway.server.outbox import Connection

__all__ = ["AdminExecutor"]

logger = logging.getLogger(__name__)

#: Deliveries (a session and one connection viewing it) one instance lists in its answer
#: to ``admin sessions``.
_ADMIN_MAX_SESSIONS = 1000
#: A command's nonce first seen (by any instance) longer ago than this is a replay. One
#: publication reaches every subscribed instance well within it.
FANOUT_GRACE_MS = 2000

Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class AdminExecutor:
    """Checks published admin commands and carries them out here."""

    def __init__(
        self,
        checker: CommandChecker,
        instance_id: InstanceId,
        store: Store,
        delivery: Delivery,
        connections: Callable[[], Iterable[Connection]],
        spawn: Spawn,
    ) -> None:
        self.checker = checker
        self.instance_id = instance_id
        self.store = store
        self.delivery = delivery
        self._connections = connections
        self._spawn = spawn
        self._nonces = AdminNonces(store.redis, store.keys)

    def on_message(self, data: bytes) -> None:
        """A message on the admin channel: run it if its signature and age are right."""
        try:
            command = self.checker.check(data, now_ms())
        except AdminError as exc:
            logger.warning("admin command refused: %s", exc)
            return
        self._spawn(self._run_unless_replayed(command), f"admin-{command.command}")

    async def _run_unless_replayed(self, command: AdminCommand) -> None:
        """Run ``command`` unless its nonce was seen before its publication reached us.

        The check in memory (``CommandChecker``) forgets on restart; this one is in Redis,
        shared by every instance. Redis unreachable: refused (it cannot be checked).
        """
        try:
            age_ms = await self._nonces.age_ms(command.nonce, 2 * MAX_AGE_MS)
        except BackendUnavailable:
            logger.warning("admin command %s refused: its nonce cannot be checked", command.command)
            return
        if age_ms > FANOUT_GRACE_MS:
            logger.warning("admin command refused: replayed command (nonce first seen %d ms ago)", age_ms)
            return
        logger.info("admin command %s %s", command.command, command.args)
        await self.run(command)

    async def run(self, command: AdminCommand) -> None:
        """Carry out ``command`` and answer on its reply channel."""
        appid = command.args.get("appid")
        connections = list(self._connections())
        targets = [c for c in connections if appid is None or c.appid == appid]
        reply: dict[str, Any] = {"instance": self.instance_id, "command": command.command}
        if command.command == "broadcast":
            frame = frames.broadcast_frame(command.args["message"])
            reply["connections"] = sum(c.push(frame, b"broadcast") for c in targets)
        elif command.command in ("disconnect-all", "disconnect-app"):
            for connection in targets:
                connection.request_close(CLOSE_ADMIN_DISCONNECT, "Disconnected by admin", flush=True)
            reply["connections"] = len(targets)
        else:  # sessions
            reply["connections"] = len(connections)
            reply["sessions"] = [
                {
                    "session_id": s.id,
                    "appid": s.connection.appid,
                    "connection_id": s.connection.id,
                    "last_seq": s.state.last_seq,
                }
                for s in itertools.islice(self.delivery.viewers(), _ADMIN_MAX_SESSIONS)
            ]
        try:
            await self.store.signals.answer_admin(command.reply_to, orjson.dumps(reply))
        except BackendUnavailable:
            logger.warning("could not answer admin command %s", command.command)
