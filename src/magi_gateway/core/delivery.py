"""Delivery of one session to one connection, sans-I/O: what to do with each message.

A session's messages reach a connection two ways: live notifications, and replays
read from the session's log (after a ``resume``, after a notification that skipped
ahead, after a notification outage). ``SessionDelivery`` decides, event by event,
so that the client gets every message once and in order:

- ``on_notification(seq)`` → ``SEND`` it now, ``DROP`` it (sent already, or a replay
  running will read it), or ``REPLAY``: start reading the log from the cursor;
- ``start_replay()`` → whether the driver must start a replay task (one at a time);
- ``next_page()`` → the first seq the replay reads next;
- ``page_read(count, page)`` → whether the replay has caught up and hands over to
  live delivery (nothing arrived while it read);
- ``sent(seq)`` after each frame handed to the client;
- ``resumed(last_seq)`` when the client resumes the session again on the same
  connection: the delivery carries on (no second one starts), its cursor moved forward.

The driver (``server.delivery``) owns the I/O: reading pages, waiting for room in
the connection's outbox, and pushing frames.
"""

from __future__ import annotations

import enum

from magi_gateway.core.ids import ConnectionId, SessionId
from magi_gateway.core.session import DeliveryCursor

__all__ = ["Action", "SessionDelivery"]


class Action(enum.Enum):
    """What to do with a live notification."""

    SEND = "send"
    DROP = "drop"
    REPLAY = "replay"


class SessionDelivery:
    """One session delivered to one connection: its cursor and replay state."""

    __slots__ = ("_missed", "_replaying", "chunk_seen", "connection_id", "cursor", "session_id", "started")

    def __init__(
        self,
        session_id: SessionId,
        connection_id: ConnectionId,
        last_seq: int = 0,
        started: float | None = None,
    ) -> None:
        self.session_id = session_id
        self.connection_id = connection_id
        self.cursor = DeliveryCursor(last_seq)
        #: Monotonic time of the ``agent_judgement`` when it was opened on this connection.
        self.started = started
        #: Whether a stream chunk was delivered yet (for the time-to-first-chunk metric).
        self.chunk_seen = False
        self._replaying = False
        self._missed = False

    @property
    def last_seq(self) -> int:
        """The last seq handed to the client."""
        return self.cursor.last_seq

    @property
    def replaying(self) -> bool:
        """Whether a replay owns delivery until it has caught up with the log."""
        return self._replaying

    def on_notification(self, seq: int) -> Action:
        """A live notification of ``seq`` arrived."""
        if self._replaying:
            self._missed = True  # the replay reads it from the log
            return Action.DROP
        offer = self.cursor.offer(seq)
        if offer is True:
            return Action.SEND
        if offer is False:
            return Action.DROP
        return Action.REPLAY

    def on_run(self, first_seq: int, last_seq: int) -> bool:
        """A live notification of the consecutive seqs ``first_seq`` to ``last_seq``: True
        when each is the next to send (they count as sent: the driver hands them over now),
        False when they must be decided one by one (``on_notification``)."""
        if self._replaying or first_seq != self.cursor.last_seq + 1:
            return False
        self.cursor.sent(last_seq)
        return True

    def start_replay(self) -> bool:
        """Whether a replay must start now; False when one runs (it reads once more)."""
        if self._replaying:
            self._missed = True
            return False
        self._replaying = True
        return True

    def next_page(self) -> int:
        """The first seq the replay reads next."""
        self._missed = False
        return self.cursor.last_seq + 1

    def page_read(self, count: int, page: int) -> bool:
        """A page of ``count`` entries (at most ``page``) was delivered; True: caught up, done."""
        if count < page and not self._missed:
            self._replaying = False
            return True
        return False

    def resumed(self, last_seq: int) -> None:
        """The client resumed this delivery again, having seen up to ``last_seq``.

        It replaces the earlier resume rather than adding a second delivery: what was
        handed to the client stays handed (it arrives, in order, on this connection), so
        the cursor only moves forward.
        """
        self.cursor.sent(last_seq)

    def replay_ended(self) -> None:
        """The replay stopped early (connection gone, session moved): no replay runs now."""
        self._replaying = False

    def sent(self, seq: int) -> None:
        """``seq`` was handed to the client."""
        self.cursor.sent(seq)
