"""Delivery of session messages to this instance's connections: the driver of
``core.delivery.SessionDelivery``.

A session may have any number of viewers (connections following it, here and on other
instances, see ``redis.viewers``); each viewer here has its own delivery, cursor and
replay, so each gets every message once, in order, however the others read.

Live notifications are handled synchronously (``deliver`` never awaits, so one slow
session cannot stall the listener that serves every session). When the core says
``REPLAY`` (a notification skipped ahead) or a connection attaches with a
``last_seq``, a replay task reads the log in pages of at most half the connection's
buffer (in frames, and about half its bytes), waiting for room between pages and before
a frame that does not fit; notifications arriving meanwhile are left to it. A repeated
``resume`` on the same connection keeps the one delivery running (``attach``).
Which sessions a connection watches is derived from this index, never kept twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Protocol

from magi_gateway._util import Backoff
from magi_gateway.core import frames
from magi_gateway.core.delivery import Action, SessionDelivery
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import ConnectionId, InstanceId, SessionId
from magi_gateway.core.notification import Message, chunk_run
from magi_gateway.redis.store import Store
from magi_gateway.server import metrics
from magi_gateway.server.outbox import Connection

__all__ = ["Delivery", "LocalSession"]

logger = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], object]

_ACCEPTED = b"agent_judgement_accepted"
_STREAM = b"agent_judgement_stream"
_FINAL = b"agent_judgement_final"
_COMPLETE = b"agent_judgement_complete"
#: Entries of a replay's first page; later pages grow to half the connection's buffer,
#: or to what fits in half its byte bound.
_FIRST_PAGE = 64


class Translation(Protocol):
    """Queues a stored frame as a client of another dialect gets it (``server.dialect``)."""

    #: At most how many more frames, and bytes, a stored frame becomes (replays wait for that room).
    extra_frames: int
    extra_bytes: int

    def __call__(self, frame: bytes, kind: bytes, /) -> bool: ...


class LocalSession:
    """A session delivered to one of this instance's connections (one viewer of it)."""

    __slots__ = ("connection", "extra", "plain", "registered", "send", "state")

    def __init__(
        self,
        state: SessionDelivery,
        connection: Connection,
        *,
        registered: bool,
        translation: Translation | None = None,
    ) -> None:
        self.state = state
        self.connection = connection
        #: Whether this viewer is registered in Redis (to renew, and to remove when it stops).
        self.registered = registered
        #: Queues one stored frame for the client: the connection's ``push`` (the bytes as
        #: stored), or the session's ``translation``.
        self.send: Callable[[bytes, bytes], bool] = connection.push if translation is None else translation
        self.extra = (0, 0) if translation is None else (translation.extra_frames, translation.extra_bytes)
        #: Whether stored frames go out as they are (a run of chunks may go in one push).
        self.plain = translation is None

    @property
    def id(self) -> SessionId:
        """The session's id."""
        return self.state.session_id


class Delivery:
    """The sessions this instance delivers: by id, each to its viewers here, and by connection."""

    def __init__(
        self,
        store: Store,
        spawn: Spawn,
        backoff: Callable[[], Backoff],
        instance_id: InstanceId,
        is_open: Callable[[Connection], bool] = lambda _: True,
    ) -> None:
        self.store = store
        self._spawn = spawn
        self._backoff = backoff
        self.instance_id = instance_id
        self._is_open = is_open
        #: Session -> its viewers here, by connection.
        self.sessions: dict[SessionId, dict[ConnectionId, LocalSession]] = {}
        self._by_connection: dict[ConnectionId, set[SessionId]] = {}
        self._delivering = metrics.SESSIONS.labels("delivering")

    def sessions_of(self, connection: Connection) -> frozenset[SessionId]:
        """The sessions delivered to ``connection``."""
        return frozenset(self._by_connection.get(connection.id, ()))

    def viewer(self, session_id: SessionId, connection: Connection) -> LocalSession | None:
        """The delivery of ``session_id`` to ``connection``, if there is one."""
        viewers = self.sessions.get(session_id)
        session = viewers.get(connection.id) if viewers is not None else None
        return session if session is not None and session.connection is connection else None

    def viewers(self) -> Iterator[LocalSession]:
        """Every delivery here (a snapshot: safe to change the index meanwhile)."""
        return iter([session for viewers in self.sessions.values() for session in viewers.values()])

    def track(
        self,
        session_id: SessionId,
        connection: Connection,
        last_seq: int,
        started: float | None = None,
        *,
        registered: bool = False,
        translation: Translation | None = None,
    ) -> LocalSession:
        """Deliver ``session_id`` to ``connection`` from ``last_seq`` on (replacing its
        earlier delivery to that connection, if any; other viewers are not touched;
        ``translation``: see ``LocalSession.send``)."""
        state = SessionDelivery(session_id, connection.id, last_seq, started)
        session = LocalSession(state, connection, registered=registered, translation=translation)
        previous = self.viewer(session_id, connection)
        if previous is not None:
            session.registered = session.registered or previous.registered
        self.sessions.setdefault(session_id, {})[connection.id] = session
        self._by_connection.setdefault(connection.id, set()).add(session_id)
        self._delivering.set(len(self.sessions))
        return session

    def untrack(self, session: LocalSession, *, unregister: bool = False) -> None:
        """Stop delivering ``session`` to its connection (``unregister``: in Redis too)."""
        viewers = self.sessions.get(session.id)
        if viewers is None or viewers.get(session.connection.id) is not session:
            return
        del viewers[session.connection.id]
        if not viewers:
            del self.sessions[session.id]
        watched = self._by_connection.get(session.connection.id)
        if watched is not None:
            watched.discard(session.id)
            if not watched:
                del self._by_connection[session.connection.id]
        self._delivering.set(len(self.sessions))
        if unregister and session.registered:
            self._unregister([(session.id, session.connection.id)])

    def forget_connection(self, connection: Connection) -> None:
        """A connection closed: it stops being a viewer of its sessions (they run on in Redis)."""
        gone: list[tuple[SessionId, ConnectionId]] = []
        for session_id in self.sessions_of(connection):
            session = self.viewer(session_id, connection)
            if session is not None:
                self.untrack(session)
                if session.registered:
                    gone.append((session_id, connection.id))
        self._by_connection.pop(connection.id, None)
        if gone:
            self._unregister(gone)

    def registered(self, session: LocalSession, accepted: bytes) -> None:
        """Written, its viewer registered (``Store.create_session``): ``accepted`` (seq 1)
        goes out now, unless notified first, so before the answer to the next client frame."""
        if self.viewer(session.id, session.connection) is session:
            session.registered = True
            self._deliver_to(self.sessions[session.id], session, (Message(1, _ACCEPTED, accepted),))
        else:  # its connection closed meanwhile
            self._unregister([(session.id, session.connection.id)])

    def _unregister(self, viewers: Sequence[tuple[SessionId, ConnectionId]]) -> None:
        """Remove viewers from Redis, in a task (failing that, their leases expire)."""
        self._spawn(self._leave(list(viewers)), "viewers-leave")

    async def _leave(self, viewers: list[tuple[SessionId, ConnectionId]]) -> None:
        with contextlib.suppress(BackendUnavailable, BackendCommandError):
            await self.store.viewers.leave(self.instance_id, viewers)

    async def leave_all(self) -> None:
        """On shutdown: remove every viewer here from Redis at once, rather than letting
        their leases run out (other instances keep publishing to a dead channel meanwhile)."""
        registered = [session for session in self.viewers() if session.registered]
        for session in registered:
            session.registered = False  # their connections' closes need not remove them again
        await self._leave([(s.id, s.connection.id) for s in registered])

    def push(self, session: LocalSession, seq: int, kind: bytes, frame: bytes) -> None:
        """Hand one frame (of type ``kind``) to the session's connection."""
        state = session.state
        state.sent(seq)
        queued = session.send(frame, kind)
        if queued and state.started is not None:
            if kind == _STREAM and not state.chunk_seen:
                self._first_chunk(state)
            elif kind == _FINAL:
                metrics.TIME_TO_FINAL.observe(time.monotonic() - state.started)
        if kind == _COMPLETE:
            if queued and state.started is not None:
                metrics.SESSIONS_COMPLETED.inc()  # once, where it started (not on replays)
            # Nothing follows the complete: the viewer's entry expires with the session.
            self.untrack(session)

    @staticmethod
    def _first_chunk(state: SessionDelivery) -> None:  # timed where the session started
        state.chunk_seen = True
        if state.started is not None:
            metrics.TIME_TO_FIRST_CHUNK.observe(time.monotonic() - state.started)

    def deliver(self, session_id: SessionId, messages: Iterable[Message]) -> None:
        """A live notification: for each viewer here, send each message now, drop it, or
        replay a gap first."""
        viewers = self.sessions.get(session_id)
        if not viewers:
            return
        batch = messages if isinstance(messages, (tuple, list)) else tuple(messages)
        run = chunk_run(batch)
        for session in list(viewers.values()):
            state = session.state
            if run is not None and session.plain and state.on_run(*run[0]):
                # The common case: the next chunks, all of them, in one push.
                if session.connection.push_run(run[1], run[2], _STREAM) and not state.chunk_seen:
                    self._first_chunk(state)
            else:
                self._deliver_to(viewers, session, batch)

    def _deliver_to(
        self, viewers: dict[ConnectionId, LocalSession], session: LocalSession, messages: Sequence[Message]
    ) -> None:
        state, connection_id = session.state, session.connection.id
        for message in messages:
            if viewers.get(connection_id) is not session:
                return  # the complete was handed over, or the connection closed
            action = state.on_notification(message.seq)
            if action is Action.SEND:
                self.push(session, message.seq, message.type, message.frame)
            elif action is Action.REPLAY:
                self.replay(session)
                return  # the replay reads the rest of this batch from the log

    def attach(
        self,
        session_id: SessionId,
        connection: Connection,
        last_seq: int,
        *,
        restart: bool = False,
        registered: bool = False,
        translation: Translation | None = None,
    ) -> None:
        """Deliver ``session_id`` to ``connection``: replay after ``last_seq``, then live.

        A session being delivered to this connection already keeps its one delivery: a
        repeated ``resume`` replaces the earlier one instead of queueing the log again
        (what was handed stays handed: the client gets every message after ``last_seq``
        once, in order). Once the complete was handed, a new ``resume`` replays again.
        ``restart``: a new delivery from ``last_seq`` in any case (a retried judgement,
        from seq 1 again); other viewers are untouched. ``registered``: a viewer in Redis."""
        if not self._is_open(connection) or connection.closing:
            if registered:  # it closed while being registered: nobody is left to deliver to
                self._unregister([(session_id, connection.id)])
            return
        current = self.viewer(session_id, connection)
        if current is not None and not restart:
            current.state.resumed(last_seq)
            current.registered = current.registered or registered
            return
        self.replay(
            self.track(session_id, connection, last_seq, registered=registered, translation=translation)
        )

    def replay(self, session: LocalSession) -> None:
        """Start reading the log from the session's cursor, unless a replay runs already."""
        if session.state.start_replay():
            self._spawn(self._replay(session), f"replay-{session.id}")

    def replay_all(self) -> None:
        """After a notification outage: every delivery re-reads what it may have missed."""
        for session in self.viewers():
            self.replay(session)

    def _current(self, session: LocalSession) -> bool:
        """Whether ``session`` is still what this instance delivers to an open connection."""
        viewers = self.sessions.get(session.id)
        return (
            viewers is not None
            and viewers.get(session.connection.id) is session
            and not session.connection.closing
        )

    async def _replay(self, session: LocalSession) -> None:
        connection, state = session.connection, session.state
        page = max(connection.max_messages // 2, 1)
        half_bytes = max(connection.max_bytes // 2, 1)
        count = min(page, _FIRST_PAGE)
        extra_frames, extra_bytes = session.extra
        room = 1 + extra_frames  # frames one stored frame becomes, at most
        backoff = self._backoff()
        try:
            while self._current(session):
                # Half the buffer free (frames and bytes) before a page is read.
                await connection.wait_for_room(count, half_bytes)
                if not self._current(session):
                    return
                first = state.next_page()
                try:
                    entries = await self.store.read_log(session.id, first, count=count)
                except BackendUnavailable as exc:
                    await asyncio.sleep(backoff.failed(logger, f"replay of {session.id}", exc))
                    continue
                except BackendCommandError as exc:
                    # Retrying cannot help: the client hears of it and may resume again.
                    logger.error("replay of %s failed: %s", session.id, exc.__cause__)
                    exc.session_id = session.id
                    connection.push(frames.error_frame(exc), b"error")
                    self.untrack(session, unregister=True)
                    return
                size = 0
                for seq, kind, frame in entries:
                    if not connection.outbox.has_room(room, len(frame) + extra_bytes):
                        # Large frames: the page goes out as the client reads, not at once.
                        await connection.wait_for_room(room, len(frame) + extra_bytes)
                    if not self._current(session):
                        return
                    if seq > state.last_seq:  # a repeated resume may have moved the cursor on
                        self.push(session, seq, kind, frame)
                    size += len(frame)
                if state.page_read(len(entries), count):
                    return  # caught up; no await between this check and the hand-over
                # Pages of about half the byte bound: what a replay holds stays bounded too.
                count = max(1, min(page, half_bytes * len(entries) // max(size, 1)))
        finally:
            state.replay_ended()
