"""Every frame the gateway sends, built in one place (sans-I/O).

Connection-level frames (``connection_established``, ``pong``, ``agents``, errors,
``broadcast``) are encoded whole. A session frame is stored in Redis by the append
script, which allocates its ``seq``: it is built from a *head* that ends just before
the seq (``{"type":…,"session_id":…,"seq":``) and a *tail*, the JSON object of the
remaining fields without its opening brace; the script joins ``head seq , tail``.
Both halves come from here, so the script knows no field name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import orjson

from magi_gateway.core.errors import GatewayError
from magi_gateway.core.ids import AgentId, SessionId

__all__ = [
    "AUTH_FAILED",
    "AUTH_THROTTLED",
    "PONG",
    "TOKEN_EXPIRED",
    "TOO_MANY_CONNECTIONS",
    "SessionFrameType",
    "accepted_frame",
    "accepted_tail",
    "agents_frame",
    "broadcast_frame",
    "complete_tail",
    "connection_established",
    "encode",
    "error_frame",
    "final_tail",
    "internal_error_frame",
    "pong",
    "refreshed_frame",
    "session_head",
    "stream_tail",
    "stream_tail_affixes",
]

SessionFrameType = Literal[
    "agent_judgement_accepted",
    "agent_judgement_stream",
    "agent_judgement_final",
    "agent_judgement_complete",
]


def encode(message: Any) -> bytes:
    """Encode a server frame (compact JSON, UTF-8)."""
    return orjson.dumps(message)


PONG: Final = b'{"type":"pong"}'
AUTH_FAILED: Final = encode({"error": "Authentication failed", "code": "auth_failed"})
AUTH_THROTTLED: Final = encode(
    {"error": "Too many failed authentication attempts; try again later", "code": "auth_throttled"}
)
TOO_MANY_CONNECTIONS: Final = encode(
    {"error": "Too many connections for this appid; try again later", "code": "too_many_connections"}
)

#: Sent when a connection's JWT reaches its ``exp`` unrefreshed, before the close (4001).
TOKEN_EXPIRED: Final = encode({"error": "Token expired", "code": "token_expired"})


def connection_established(connection_id: str) -> bytes:
    """The greeting after a successful handshake."""
    return encode({"type": "connection_established", "connection_id": connection_id})


def pong(request_id: str | None = None) -> bytes:
    """The answer to ``ping`` (with the ping's ``request_id`` when it had one)."""
    return PONG if request_id is None else encode({"type": "pong", "request_id": request_id})


def agents_frame(agents: Mapping[AgentId, int], request_id: str | None = None) -> bytes:
    """The answer to ``get_agents``: agents with live workers, and how many."""
    frame: dict[str, Any] = {
        "type": "agents",
        "agents": [{"agent_id": a, "workers": n} for a, n in agents.items()],
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return encode(frame)


def refreshed_frame(expires_at: float, request_id: str | None = None) -> bytes:
    """The answer to a valid ``refresh``: the connection now ends at the new token's ``exp``."""
    frame: dict[str, Any] = {
        "type": "refreshed",
        "expires_at": int(expires_at) if expires_at.is_integer() else expires_at,
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return encode(frame)


def broadcast_frame(message: str) -> bytes:
    """An operator's ``magi-gateway admin broadcast``."""
    return encode({"type": "broadcast", "message": message})


def error_frame(exc: GatewayError) -> bytes:
    """The error frame a client receives for ``exc`` (its text is client-safe by contract)."""
    frame: dict[str, Any] = {"error": str(exc), "code": exc.code}
    if exc.session_id is not None:
        frame["session_id"] = exc.session_id
    if exc.request_id is not None:
        frame["request_id"] = exc.request_id
    return encode(frame)


def internal_error_frame(request_id: str | None = None) -> bytes:
    """Frame for an unexpected exception: its text stays in the logs."""
    if request_id is not None:
        return encode({"error": "Internal server error", "code": "internal_error", "request_id": request_id})
    return b'{"error":"Internal server error","code":"internal_error"}'


def session_head(message_type: SessionFrameType, session_id: SessionId) -> bytes:
    """The start of a session frame, up to (not including) its seq."""
    return b'{"type":"%s","session_id":"%s","seq":' % (message_type.encode(), session_id.encode())


def accepted_frame(session_id: SessionId, agent_ids: Iterable[AgentId], request_id: str | None) -> bytes:
    """The whole ``agent_judgement_accepted`` (seq 1), as ``lua/append.lua`` joins it."""
    head = session_head("agent_judgement_accepted", session_id)
    return b"%s1,%s" % (head, accepted_tail(agent_ids, request_id))


def _tail(fields: dict[str, Any]) -> bytes:
    return orjson.dumps(fields)[1:]


def accepted_tail(agent_ids: Iterable[AgentId], request_id: str | None) -> bytes:
    """Tail of ``agent_judgement_accepted``."""
    return _tail({"agent_ids": list(agent_ids), "request_id": request_id})


def stream_tail(agent_id: str, data: dict[str, Any]) -> bytes:
    """Tail of ``agent_judgement_stream``."""
    return _tail({"agent_id": agent_id, "data": data})


def stream_tail_affixes(agent_id: str, extra: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """What goes around a JSON-encoded thinking string to make a stream tail.

    ``prefix + orjson.dumps(text) + suffix == stream_tail(agent_id, {"thinking": text, **extra})``:
    a worker builds these once per request and encodes only the text per chunk.
    """
    prefix = b'"agent_id":' + orjson.dumps(agent_id) + b',"data":{"thinking":'
    suffix = (b"," + orjson.dumps(dict(extra))[1:-1] if extra else b"") + b"}}"
    return prefix, suffix


def final_tail(agent_id: str, result_code: int, data: dict[str, Any]) -> bytes:
    """Tail of ``agent_judgement_final``."""
    return _tail({"agent_id": agent_id, "result_code": result_code, "data": data})


def complete_tail(verdict: str, results: dict[str, dict[str, Any]]) -> bytes:
    """Tail of ``agent_judgement_complete``."""
    return _tail({"data": {"verdict": verdict, "results": results}})
