"""Delivery of session messages to this instance's connections: in order, each once.

Live notifications are handled synchronously (``deliver`` never awaits, so one slow
session cannot stall the listener that serves every session). When a notification
skips ahead of a session's cursor, or a connection attaches with a ``last_seq``, a
replay task reads the log from the cursor in pages, waiting for the connection's
buffer to have room between pages; notifications arriving meanwhile are left to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.core.ids import SessionId
from magi_gateway.core.session import DeliveryCursor
from magi_gateway.redis.client import Backoff
from magi_gateway.redis.store import Store
from magi_gateway.server import metrics
from magi_gateway.server.outbox import Connection

__all__ = ["Delivery", "LocalSession"]

logger = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class LocalSession:
    """A session delivered to one of this instance's connections."""

    __slots__ = ("chunk_seen", "connection", "cursor", "id", "missed", "replaying", "started")

    def __init__(
        self, session_id: SessionId, connection: Connection, last_seq: int, started: float | None = None
    ) -> None:
        self.id = session_id
        self.connection = connection
        self.cursor = DeliveryCursor(last_seq)
        #: ``time.monotonic()`` of the ``agent_judgement`` when it was opened here (for metrics).
        self.started = started
        self.chunk_seen = False
        #: A replay task owns delivery until it has caught up with the log.
        self.replaying = False
        #: A notification arrived during the replay: read the log once more.
        self.missed = False


class Delivery:
    """The sessions this instance delivers, by id."""

    def __init__(self, store: Store, spawn: Spawn, backoff: Callable[[], Backoff]) -> None:
        self.store = store
        self._spawn = spawn
        self._backoff = backoff
        self.sessions: dict[SessionId, LocalSession] = {}
        self._delivering = metrics.SESSIONS.labels("delivering")

    def track(
        self, session_id: SessionId, connection: Connection, last_seq: int, started: float | None = None
    ) -> LocalSession:
        """Deliver ``session_id`` to ``connection`` from ``last_seq`` on (moving it if needed)."""
        previous = self.sessions.get(session_id)
        if previous is not None and previous.connection is not connection:
            previous.connection.sessions.discard(session_id)
        session = LocalSession(session_id, connection, last_seq, started)
        self.sessions[session_id] = session
        connection.sessions.add(session_id)
        self._delivering.set(len(self.sessions))
        return session

    def untrack(self, session: LocalSession) -> None:
        """Stop delivering ``session`` here."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self._delivering.set(len(self.sessions))
        session.connection.sessions.discard(session.id)

    def forget_connection(self, connection: Connection) -> None:
        """A connection closed: stop delivering its sessions (they run on in Redis)."""
        for session_id in list(connection.sessions):
            session = self.sessions.get(session_id)
            if session is not None and session.connection is connection:
                self.untrack(session)
        connection.sessions.clear()

    def push(self, session: LocalSession, seq: int, frame: bytes) -> None:
        """Hand one frame to the session's connection."""
        session.cursor.sent(seq)
        kind = metrics.message_type(frame)
        queued = session.connection.push(frame, kind)
        if queued and session.started is not None:
            if kind == b"agent_judgement_stream" and not session.chunk_seen:
                session.chunk_seen = True
                metrics.TIME_TO_FIRST_CHUNK.observe(time.monotonic() - session.started)
            elif kind == b"agent_judgement_final":
                metrics.TIME_TO_FINAL.observe(time.monotonic() - session.started)
        if kind == b"agent_judgement_complete":
            if queued and session.started is not None:
                metrics.SESSIONS_COMPLETED.inc()  # once, where it started (not on replays)
            self.untrack(session)

    def deliver(self, session_id: SessionId, seq: int, frame: bytes) -> None:
        """A live notification: send it now, drop it as a duplicate, or replay a gap."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        if session.replaying:
            session.missed = True
            return
        offer = session.cursor.offer(seq)
        if offer is True:
            self.push(session, seq, frame)
        elif offer is not False:
            self.replay(session)

    def replay(self, session: LocalSession) -> None:
        """Start reading the log from the session's cursor, unless a replay runs already."""
        if session.replaying:
            session.missed = True
            return
        session.replaying = True
        self._spawn(self._replay(session), f"replay-{session.id}")

    def replay_all(self) -> None:
        """After a notification outage: every session re-reads what it may have missed."""
        for session in list(self.sessions.values()):
            self.replay(session)

    async def _replay(self, session: LocalSession) -> None:
        connection = session.connection
        page = max(connection.max_messages // 2, 1)
        backoff = self._backoff()
        try:
            while self.sessions.get(session.id) is session and not connection.closing:
                await connection.wait_for_room(page)
                session.missed = False
                try:
                    entries = await self.store.read_log(session.id, session.cursor.last_seq + 1, count=page)
                except BackendUnavailable:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                for seq, frame in entries:
                    self.push(session, seq, frame)
                if len(entries) < page and not session.missed:
                    return  # caught up; no await between this check and the flag reset
        finally:
            session.replaying = False
