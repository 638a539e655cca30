"""The notification a gateway instance receives for each message of a session (sans-I/O).

The append script publishes, on the channel of the instance delivering the session::

    SESSION_ID "\\n" SEQ "\\n" TYPE "\\n" FRAME

``FRAME`` is the stored frame, relayed to clients byte for byte; ``TYPE`` its message
type, so nobody parses the frame to count it. A readiness probe is the same shape
with an empty session id and the probe's token as its frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from magi_gateway.core.errors import ProtocolError
from magi_gateway.core.ids import SessionId

__all__ = ["Notification", "decode_notification", "notify_prefix", "probe_notification"]


@dataclass(frozen=True, slots=True)
class Notification:
    """One decoded notification; ``session_id`` is empty for a readiness probe."""

    session_id: SessionId
    seq: int
    type: bytes
    frame: bytes

    @property
    def is_probe(self) -> bool:
        """Whether this is a readiness probe (its frame is the probe's token)."""
        return not self.session_id


def notify_prefix(session_id: str) -> bytes:
    """The first line of a session's notifications (the script appends the rest)."""
    return session_id.encode() + b"\n"


def probe_notification(token: bytes) -> bytes:
    """A readiness probe carrying ``token``."""
    return b"\n0\nprobe\n" + token


def decode_notification(data: bytes) -> Notification:
    """Split a published notification; ``ProtocolError`` when it is not one (never trusted)."""
    parts = data.split(b"\n", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        raise ProtocolError("malformed notification", code="bad_notification")
    try:
        session_id = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed notification", code="bad_notification") from None
    return Notification(SessionId(session_id), int(parts[1]), parts[2], parts[3])
