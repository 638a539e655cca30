"""The original system's pub/sub wire format (sans-I/O), as ``PubSubBridge`` speaks it.

Its gateway ``PUBLISH``ed each client frame plus ``session_id`` on
``gateway:requests:{session_id}`` (the same frame the list era queued,
``core.legacy.legacy_request``); its backends answered on
``gateway:responses:{session_id}`` with::

    {"type": "agent_response", "session_id", "request_id", "agent_id", "status",
     "timestamp", "content"?, "error"?}        status: processing | streaming | completed | error
    {"type": "agent_judgement_response", "status": "error", "error"}   the whole request failed

and with ``get_voters_response`` and the like, which are no judgement's business. The
verdict is in the streamed text, as ``<decision>POSITIVE|NEGATIVE</decision>``:
``VerdictText`` concatenates it (bounded) and finds the tag across chunk boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from magi_gateway.core.ids import SessionId, is_session_id
from magi_gateway.core.legacy import decision_of, json_object

__all__ = ["OriginalResponse", "Status", "VerdictText", "parse_original_response"]

Status = Literal["processing", "streaming", "completed", "error"]
_STATUSES: frozenset[str] = frozenset({"processing", "streaming", "completed", "error"})
#: A ``<decision>`` tag split across chunks is found in this much of the text before a chunk.
_TAG_WINDOW = 256
_TRUNCATED = "\n[…]"


@dataclass(frozen=True, slots=True)
class OriginalResponse:
    """One answer of a pub/sub-era backend, checked.

    ``agent_id`` None: for whichever agent of the session it can only be; ``whole_request``:
    an ``agent_judgement_response`` error, for every agent of the session.
    """

    session_id: SessionId
    agent_id: str | None
    status: Status
    content: str = ""
    error: str | None = None
    whole_request: bool = False


def parse_original_response(raw: bytes, channel_session: str | None) -> OriginalResponse | str:
    """Check one message from a response channel; return it, or why it is not one to relay.

    The session is the message's ``session_id``, else the one its channel names.
    """
    message = json_object(raw)
    if isinstance(message, str):
        return message
    kind = message.get("type")
    if kind not in ("agent_response", "agent_judgement_response"):
        return "other_type"  # get_voters_response and the like
    session_id = message.get("session_id", channel_session)
    if not is_session_id(session_id):
        return "unknown_session"
    status = message.get("status")
    if kind == "agent_judgement_response":
        if status != "error":
            return "other_type"
        return OriginalResponse(
            SessionId(session_id), None, "error", error=_error_text(message), whole_request=True
        )
    if status not in _STATUSES:
        return "bad_status"
    agent_id = message.get("agent_id")
    if agent_id is not None and not isinstance(agent_id, str):
        return "unknown_agent"
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return "bad_content"
    error = _error_text(message) if status == "error" else None
    return OriginalResponse(SessionId(session_id), agent_id, status, content or "", error)


def _error_text(message: dict[str, object]) -> str:
    error = message.get("error")
    return error if isinstance(error, str) and error else "The agent reported an error"


class VerdictText:
    """An agent's streamed text, concatenated up to ``max_bytes`` (UTF-8), and its decision.

    Overflow policy: text past ``max_bytes`` is left out of the judgement (``truncated``;
    the client saw all of it streamed), the decision is still read from all of it: the
    last ``<decision>`` tag wins, ``abstain`` without one.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.truncated = False
        self._parts: list[str] = []
        self._bytes = 0
        self._tail = ""
        self._decision: str | None = None

    def add(self, piece: str) -> None:
        """Append one chunk of the agent's text."""
        window = self._tail + piece
        found = decision_of(window)
        if found is not None:
            self._decision = found
        self._tail = window[-_TAG_WINDOW:]
        if self.truncated:
            return
        size = len(piece.encode())
        if self._bytes + size <= self.max_bytes:
            self._parts.append(piece)
            self._bytes += size
            return
        room = self.max_bytes - self._bytes
        self._parts.append(piece.encode()[:room].decode(errors="ignore") + _TRUNCATED)
        self.truncated = True

    @property
    def text(self) -> str:
        """The concatenated text (cut at ``max_bytes`` when ``truncated``)."""
        return "".join(self._parts)

    @property
    def decision(self) -> str:
        """``approve`` / ``reject`` from the last ``<decision>`` tag, else ``abstain``."""
        return self._decision or "abstain"
