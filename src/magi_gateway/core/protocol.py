"""The client protocol, sans-I/O: client frames in, typed messages out, and back.

``parse_client_frame`` turns one WebSocket text frame into a frozen message object
or raises ``ProtocolError`` with the code the client will see. Server frames are
built in ``frames``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from magi_gateway.core.errors import FrameTooLarge, ProtocolError, TooManyAgents
from magi_gateway.core.ids import AgentId, SessionId, is_session_id

__all__ = [
    "AGENT_ID_PATTERN",
    "MAX_SEQ",
    "Cancel",
    "ClientMessage",
    "GetAgents",
    "GetVoters",
    "JudgementRequest",
    "Limits",
    "Ping",
    "Refresh",
    "Resume",
    "extra_fields",
    "parse_client_frame",
    "parse_judgement_body",
    "request_id_of",
]

#: Agent ids are used in Redis key names, so they are kept to a safe alphabet.
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_MAX_REQUEST_ID_CHARS = 128
#: The largest seq a client may name: JSON-safe, and far above any session's length.
MAX_SEQ = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while parsing client frames."""

    max_frame_bytes: int = 64 * 1024
    max_agents: int = 16
    max_input_bytes: int = 32 * 1024


@dataclass(frozen=True, slots=True)
class JudgementRequest:
    """``agent_judgement``: ask agents to judge an input."""

    agent_ids: tuple[AgentId, ...]
    user_input: str
    request_id: str | None = None
    #: The frame's other fields (``request``, ``timestamp``, ``agents``, and ``data``
    #: without ``user_input``), bounded by ``max_frame_bytes`` as the frame is. Passed
    #: through as they came, so not part of the message's equality.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The frame was in the original system's form (``agents`` objects, or the input in
    #: ``request`` / ``context``): its session is answered in that system's reply shapes.
    original: bool = False
    type: Literal["agent_judgement"] = "agent_judgement"

    def forwarded_fields(self) -> bytes:
        """``extra`` and ``request_id``, JSON-encoded (b"" when none): what workers get of
        the frame besides the input, and the bridges forward to the original backends."""
        if self.request_id is None and not self.extra:
            return b""
        head = {} if self.request_id is None else {"request_id": self.request_id}
        return orjson.dumps({**head, **self.extra})


@dataclass(frozen=True, slots=True)
class Cancel:
    """``cancel``: stop a session's pending agents."""

    session_id: SessionId
    request_id: str | None = None
    type: Literal["cancel"] = "cancel"


@dataclass(frozen=True, slots=True)
class Resume:
    """``resume``: re-attach to a session and replay messages after ``last_seq``."""

    session_id: SessionId
    last_seq: int
    request_id: str | None = None
    type: Literal["resume"] = "resume"


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: liveness check, answered with ``pong``."""

    request_id: str | None = None
    type: Literal["ping"] = "ping"


@dataclass(frozen=True, slots=True)
class GetAgents:
    """``get_agents``: list agents that have live workers."""

    request_id: str | None = None
    type: Literal["get_agents"] = "get_agents"


@dataclass(frozen=True, slots=True)
class Refresh:
    """``refresh``: a new JWT before the connection's one expires."""

    token: str
    request_id: str | None = None
    type: Literal["refresh"] = "refresh"


@dataclass(frozen=True, slots=True)
class GetVoters:
    """``get_voters`` (the original system's): list the agents a judgement may ask."""

    request_id: str | None = None
    type: Literal["get_voters"] = "get_voters"


ClientMessage = JudgementRequest | Cancel | Resume | Ping | GetAgents | GetVoters | Refresh


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise ProtocolError(f"Missing field: {name}", code="missing_field")
    return obj[name]


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(message, code="invalid_field")


def _session_id(obj: dict[str, Any]) -> SessionId:
    value = _field(obj, "session_id")
    if not is_session_id(value):
        raise _invalid("session_id must be a session id returned by the gateway")
    return SessionId(value)


def _judgement(obj: dict[str, Any], limits: Limits) -> JudgementRequest:
    """The seed form (``agent_ids``, ``data.user_input``) or the original system's
    (``agents: [{"agent_id"}]``, the input in ``request``, or in the older top-level
    ``context`` / ``judgement``); a field of the seed form wins when both are present."""
    original_agents = "agent_ids" not in obj and "agents" in obj
    agent_ids = _original_agent_ids(obj["agents"]) if original_agents else _field(obj, "agent_ids")
    named = "agents" if original_agents else "agent_ids"  # errors use the client's own words
    if not isinstance(agent_ids, list) or not agent_ids:
        raise _invalid(f"{named} must be a non-empty list of strings")
    if len(agent_ids) > limits.max_agents:
        raise TooManyAgents(f"At most {limits.max_agents} agents per judgement")
    for agent_id in agent_ids:
        if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise _invalid("Each agent id must be 1-64 characters of letters, digits, '_', '.' or '-'")
    if len(set(agent_ids)) != len(agent_ids):
        raise _invalid(f"{named} must not repeat an agent")
    original_input = "data" not in obj and _ORIGINAL_INPUTS & obj.keys()
    if original_input:
        user_input, name = _original_input(obj)
    else:
        data = _field(obj, "data")
        if not isinstance(data, dict):
            raise _invalid("data must be an object")
        user_input, name = _field(data, "user_input"), "data.user_input"
    if not isinstance(user_input, str):
        raise _invalid(f"{name} must be a string")
    if len(user_input.encode()) > limits.max_input_bytes:
        raise _invalid(f"{name} exceeds {limits.max_input_bytes} bytes")
    return JudgementRequest(
        tuple(AgentId(a) for a in agent_ids),
        user_input,
        _valid_request_id(obj),
        original=bool(original_agents or original_input),
    )


#: Where the original system's clients put the input: ``request`` (the frontend and CLI
#: client), or ``context`` and ``judgement`` (an older client).
_ORIGINAL_INPUTS = frozenset({"request", "context", "judgement"})


def _original_agent_ids(agents: Any) -> list[Any]:
    """The ids of ``agents: [{"agent_id": …}, …]``."""
    if (
        not isinstance(agents, list)
        or not agents
        or not all(isinstance(a, dict) and "agent_id" in a for a in agents)
    ):
        raise _invalid('agents must be a non-empty list of {"agent_id": "..."} objects')
    return [a["agent_id"] for a in agents]


def _original_input(obj: dict[str, Any]) -> tuple[Any, str]:
    """The input of an original-form frame, and the name its errors give it."""
    if "request" in obj:
        return obj["request"], "request"
    parts = [obj[name] for name in ("context", "judgement") if name in obj]
    name = "context" if "context" in obj else "judgement"
    if not all(isinstance(part, str) for part in parts):
        return None, name
    return "\n".join(parts), name


#: Fields of a judgement frame ``JudgementRequest`` has already; ``extra_fields`` keeps the rest.
_CARRIED_FIELDS = frozenset({"type", "agent_ids", "data", "request_id"})


def extra_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The frame's fields other than those ``JudgementRequest`` has already."""
    extra = {name: value for name, value in obj.items() if name not in _CARRIED_FIELDS}
    data = obj.get("data")
    if isinstance(data, dict) and data.keys() - {"user_input"}:
        extra["data"] = {name: value for name, value in data.items() if name != "user_input"}
    return extra


def _valid_request_id(obj: dict[str, Any]) -> str | None:
    request_id = obj.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or not 0 < len(request_id) <= _MAX_REQUEST_ID_CHARS
    ):
        raise _invalid(f"request_id must be a string of 1-{_MAX_REQUEST_ID_CHARS} characters")
    return request_id


def _echoed_request_id(obj: dict[str, Any]) -> str | None:
    """The ``request_id`` replies echo: a valid one; others are ignored (a judgement refuses them)."""
    request_id = obj.get("request_id")
    if isinstance(request_id, str) and 0 < len(request_id) <= _MAX_REQUEST_ID_CHARS:
        return request_id
    return None


def request_id_of(frame: str | bytes, limits: Limits) -> str | None:
    """The frame's valid ``request_id``, if it has one (for errors raised before parsing)."""
    try:
        message = parse_client_frame(frame, limits)
    except ProtocolError as exc:
        return exc.request_id
    return message.request_id


def parse_client_frame(frame: str | bytes, limits: Limits) -> ClientMessage:
    """Parse one client text frame; raise ``ProtocolError`` with a client-facing code."""
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
    return _parse(frame, size, limits, None, "Frame", "A message must be a JSON object")


def parse_judgement_body(body: bytes, limits: Limits) -> JudgementRequest:
    """Parse the body of ``POST /v1/judgements``: an ``agent_judgement`` frame without its
    ``type``, checked exactly as the WebSocket's (same limits, same error codes)."""
    message = _parse(body, len(body), limits, "agent_judgement", "Body", "The body must be a JSON object")
    assert isinstance(message, JudgementRequest)
    return message


def _parse(
    data: str | bytes, size: int, limits: Limits, kind: str | None, what: str, not_an_object: str
) -> ClientMessage:
    """One JSON object of ``size`` bytes as a message of ``kind`` (None: its ``type``)."""
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(f"{what} exceeds {limits.max_frame_bytes} bytes")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("Invalid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ProtocolError(not_an_object, code="invalid_message")
    request_id = _echoed_request_id(obj)
    try:
        return _parse_kind(obj.get("type") if kind is None else kind, obj, limits, request_id)
    except ProtocolError as exc:
        exc.request_id = request_id  # so the client knows which of its messages failed
        raise


def _parse_kind(kind: Any, obj: dict[str, Any], limits: Limits, request_id: str | None) -> ClientMessage:
    if kind is None:
        raise ProtocolError("Missing message type", code="missing_type")
    if kind == "agent_judgement":
        judgement = _judgement(obj, limits)
        extra = extra_fields(obj)
        return replace(judgement, extra=extra) if extra else judgement
    if kind == "ping":
        return Ping(request_id)
    if kind == "get_agents":
        return GetAgents(request_id)
    if kind == "get_voters":
        return GetVoters(request_id)
    if kind == "cancel":
        return Cancel(_session_id(obj), request_id)
    if kind == "resume":
        last_seq = _field(obj, "last_seq")
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq <= MAX_SEQ:
            raise _invalid(f"last_seq must be an integer from 0 to {MAX_SEQ}")
        return Resume(_session_id(obj), last_seq, request_id)
    if kind == "refresh":
        token = _field(obj, "token")
        if not isinstance(token, str) or not token:
            raise _invalid("token must be a non-empty string")
        return Refresh(token, request_id)
    shown = kind if isinstance(kind, str) and len(kind) <= 64 else "?"
    raise ProtocolError(f"Unsupported message type: {shown}", code="unknown_type")
