"""The notification a gateway instance receives for the messages of a session (sans-I/O).

The append scripts publish, on the channel of the instance delivering the session,
one notification per script call, carrying every message that call logged::

    SESSION_ID ( "\\n" SEQ "\\n" TYPE "\\n" FRAME )+

``FRAME`` is the stored frame, relayed to clients byte for byte; ``TYPE`` its message
type, so nobody parses the frame to count it. Frames are compact JSON, which never
holds a raw newline, so newlines separate the fields. A readiness probe is the same
shape with an empty session id and the probe's token as its frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from magi_gateway.core.errors import ProtocolError
from magi_gateway.core.ids import SessionId

__all__ = [
    "Message",
    "Notification",
    "chunk_run",
    "decode_notification",
    "notify_prefix",
    "probe_notification",
]

_STREAM = b"agent_judgement_stream"


class Message(NamedTuple):
    """One logged message of a session, as notified (a tuple: one is made per chunk, and
    a frozen dataclass costs three times as much to make)."""

    seq: int
    type: bytes
    frame: bytes


@dataclass(frozen=True, slots=True)
class Notification:
    """One decoded notification; ``session_id`` is empty for a readiness probe."""

    session_id: SessionId
    messages: tuple[Message, ...]

    @property
    def is_probe(self) -> bool:
        """Whether this is a readiness probe (its one frame is the probe's token)."""
        return not self.session_id


def notify_prefix(session_id: str) -> bytes:
    """The start of a session's notifications (the script appends the messages)."""
    return session_id.encode() + b"\n"


def probe_notification(token: bytes) -> bytes:
    """A readiness probe carrying ``token`` (no newline in it)."""
    return b"\n0\nprobe\n" + token


def _malformed() -> ProtocolError:
    return ProtocolError("malformed notification", code="bad_notification")


def decode_notification(data: bytes) -> Notification:
    """Split a published notification; ``ProtocolError`` when it is not one (never trusted)."""
    parts = data.split(b"\n")
    if len(parts) < 4 or (len(parts) - 1) % 3:
        raise _malformed()
    try:
        session_id = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed() from None
    messages = []
    for i in range(1, len(parts), 3):
        seq, kind, frame = parts[i : i + 3]
        if not seq.isdigit():
            raise _malformed()
        messages.append(Message(int(seq), kind, frame))
    return Notification(SessionId(session_id), tuple(messages))


def chunk_run(batch: Sequence[Message]) -> tuple[tuple[int, int], list[bytes], int] | None:
    """For a notification of two or more chunks with consecutive seqs: their first and last
    seq, their frames and their size; None for any other (one at a time, then)."""
    if len(batch) < 2:
        return None
    first, last = batch[0].seq, batch[-1].seq
    if last - first != len(batch) - 1:
        return None
    frames = []
    size = 0
    for message in batch:
        if message.type != _STREAM:
            return None
        frames.append(message.frame)
        size += len(message.frame)
    return (first, last), frames, size
