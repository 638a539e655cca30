"""The original system's wire format on its Redis lists (sans-I/O).

Its gateway queued each request as the client's message plus ``session_id``; its
backends answered with JSON messages carrying ``session_id`` (and ``agent_id`` when
they serve several agents), their payload under ``data`` or, as the list-era
``GatewayClient`` wrote them, at the top level (``content`` for thinking, ``result``
for a final). ``worker.legacy.LegacyBridge`` moves them; this module builds and checks
them. The original agents wrote their verdict into their text as
``<decision>POSITIVE</decision>`` or ``<decision>NEGATIVE</decision>``
(``decision_of``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from magi_gateway.core.ids import AgentId, SessionId, is_session_id
from magi_gateway.core.session import ResultCode

__all__ = [
    "Kind",
    "LegacyResponse",
    "decision_of",
    "json_object",
    "legacy_request",
    "parse_legacy_response",
    "resolve_agent",
]

Kind = Literal["stream", "final"]
_TYPES: dict[str, Kind] = {"agent_judgement_stream": "stream", "agent_judgement_final": "final"}
_RESULT_CODES = frozenset(int(c) for c in ResultCode)
_DECISION_TAG = re.compile(r"<decision>\s*(POSITIVE|NEGATIVE)\s*</decision>", re.IGNORECASE)
_TAGGED = {"positive": "approve", "negative": "reject"}


def json_object(raw: bytes) -> dict[str, Any] | str:
    """A backend's message as a JSON object, or why it is not one (``not_json``, ``not_an_object``)."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not_json"
    return message if isinstance(message, dict) else "not_an_object"


def decision_of(text: str) -> str | None:
    """``approve``/``reject`` from the text's last ``<decision>POSITIVE|NEGATIVE</decision>``."""
    found = _DECISION_TAG.findall(text)
    return _TAGGED[found[-1].lower()] if found else None


def legacy_request(
    session_id: SessionId,
    agent_id: AgentId,
    user_input: str,
    fields: Mapping[str, Any] | None = None,
    *,
    agents_list: bool = False,
) -> bytes:
    """A request as the original gateway queued it: the client's message plus ``session_id``.

    ``fields`` are the client frame's other fields (``Context.request_fields``: its
    ``request_id``, ``request``, ``timestamp``, ...), forwarded as they came. The message
    is for one agent: ``agent_ids`` names it and so does ``agents`` when the client sent
    that list, or ``agents_list`` asks for it (the pub/sub-era backends read it): the
    client's entry for the agent, else ``{"agent_id": AGENT}``.
    """
    fields = fields or {}
    message: dict[str, Any] = {"type": "agent_judgement", **fields, "agent_ids": [agent_id]}
    agents = fields.get("agents", [] if agents_list else None)
    if isinstance(agents, list):
        mine = [a for a in agents if isinstance(a, dict) and a.get("agent_id") == agent_id]
        message["agents"] = mine[:1] or [{"agent_id": agent_id}]
    data = fields.get("data")
    message["data"] = (
        {**data, "user_input": user_input} if isinstance(data, dict) else {"user_input": user_input}
    )
    message["session_id"] = session_id
    return orjson.dumps(message)


@dataclass(frozen=True, slots=True)
class LegacyResponse:
    """A legacy backend's message, checked; ``agent_id`` is None when it named none."""

    kind: Kind
    session_id: SessionId
    agent_id: str | None
    data: dict[str, Any]
    result_code: ResultCode = ResultCode.OK


def parse_legacy_response(raw: bytes, listed_as: Kind) -> LegacyResponse | str:
    """Check one message from a response list; return it, or why it must be dropped.

    Its ``type`` says what it is, as the original gateway forwarded it; without one, the
    list it came from does. A stream's ``data`` may be a bare string (the thinking text).
    Without ``data``, the top-level fields are the payload: a stream's ``content`` is its
    thinking, a final's ``result`` its data (a string: the judgement), with a top-level
    ``error``/``decision``. A final without ``result_code`` is 0, or 1 when it has an
    ``error``; without a ``decision``, its judgement's ``<decision>`` tag gives one.
    """
    message = json_object(raw)
    if isinstance(message, str):
        return message
    session_id = message.get("session_id")
    if session_id is None:
        return "no_session_id"
    if not is_session_id(session_id):
        return "unknown_session"
    kind = listed_as if "type" not in message else _TYPES.get(str(message["type"]))
    if kind is None:
        return "bad_type"
    agent_id = message.get("agent_id")
    if agent_id is not None and not isinstance(agent_id, str):
        return "unknown_agent"
    data = message.get("data") if "data" in message else _top_level_data(message, kind)
    if kind == "stream" and isinstance(data, str):
        data = {"thinking": data}
    elif kind == "final" and data is None:
        data = {}
    if not isinstance(data, dict):
        return "bad_data"
    if kind == "stream":
        return LegacyResponse(kind, SessionId(session_id), agent_id, data)
    text = data.get("judgement")
    if "decision" not in data and isinstance(text, str) and (tagged := decision_of(text)) is not None:
        data = {**data, "decision": tagged}
    code = message.get("result_code", 1 if "error" in data else 0)
    if isinstance(code, bool) or not isinstance(code, int) or code not in _RESULT_CODES:
        return "bad_result_code"
    if code != 0 and not isinstance(data.get("error"), str):
        data = {**data, "error": "The agent reported an error"}
    return LegacyResponse(kind, SessionId(session_id), agent_id, data, ResultCode(code))


def _top_level_data(message: dict[str, Any], kind: Kind) -> Any:
    """The payload of a message in the list-era ``GatewayClient`` form (no ``data``)."""
    if kind == "stream":
        return message.get("content")  # None (no thinking at all) is bad_data
    result = message.get("result")
    data: Any = {"judgement": result} if isinstance(result, str) else ({} if result is None else result)
    if isinstance(data, dict):
        for name in ("error", "decision"):
            if name in message and name not in data:
                data = {**data, name: message[name]}
    return data


def resolve_agent(
    named: str | None, session_agents: Sequence[AgentId], served: Collection[AgentId]
) -> AgentId | None:
    """The session's agent a response is for: the one it names, else the only candidate.

    Original backends may leave ``agent_id`` out; that is unambiguous when the session has
    one legacy agent (or one agent at all).
    """
    if named is not None:
        return AgentId(named) if named in session_agents else None
    candidates = [a for a in session_agents if a in served] or list(session_agents)
    return candidates[0] if len(candidates) == 1 else None
