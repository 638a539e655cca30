"""Delivery in the original system's dialect: the driver of ``core.dialect.OriginalReplies``.

Only sessions opened in that dialect get a ``Translation`` (``LocalSession.send``); every
other session's frames go out as stored, with no per-frame work added.
"""

from __future__ import annotations

import time

from magi_gateway.core.dialect import OriginalReplies
from magi_gateway.core.ids import SessionId
from magi_gateway.server.outbox import Connection, skipped_bad_frame

__all__ = ["OriginalTranslation", "translation_for"]


class OriginalTranslation:
    """Queues the frames ``replies`` makes of each stored frame on ``connection``."""

    __slots__ = ("connection", "extra_bytes", "extra_frames", "replies")

    def __init__(self, connection: Connection, replies: OriginalReplies) -> None:
        self.connection = connection
        self.replies = replies
        self.extra_frames, self.extra_bytes = replies.growth

    def __call__(self, frame: bytes, kind: bytes, /) -> bool:
        try:
            sent = self.replies.translate(kind, frame, time.time())
        except (ValueError, LookupError, TypeError, AttributeError):
            # Frames come from Redis: a damaged one is skipped and counted, not fatal
            # (the listener that delivers it serves every session).
            skipped_bad_frame(self.connection.id)
            return False
        queued = True
        for translated in sent:
            queued = self.connection.push(translated, kind) and queued
        return queued


def translation_for(
    connection: Connection, session_id: SessionId, dialect: bytes
) -> OriginalTranslation | None:
    """The translation of a session whose metadata holds ``dialect`` (None: sent as stored)."""
    replies = OriginalReplies.from_meta(session_id, dialect)
    return None if replies is None else OriginalTranslation(connection, replies)
