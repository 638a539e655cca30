"""The original system's client dialect, sans-I/O: agent aliases and its reply shapes.

The original frontend and CLI client name agents by fixed UUIDs and read replies of one
shape, ``agent_response``::

    {"type": "agent_response", "session_id", "request_id", "agent_id", "status",
     "timestamp", "content"?, "error"?, "seq"}

A session opened in that form (``JudgementRequest.original``) is stored like any other:
its log holds the seed frames, so every guarantee (seq, resume, retention) is the
same. ``OriginalReplies`` translates each stored frame on its way to the client, and
frames made from one stored message share its ``seq``::

    agent_judgement_accepted   ->  processing, once per agent
    agent_judgement_stream     ->  streaming, content = data.thinking
    agent_judgement_final  0   ->  streaming, content = the judgement and
                                   <decision>POSITIVE|NEGATIVE</decision>, then completed
                                   (the judgement left out when it is exactly what the
                                   agent streamed, as a pub/sub-era backend's is)
    agent_judgement_final  >0  ->  error, error = data.error
    agent_judgement_complete   ->  itself, its results keyed by the client's agent ids

Aliases (``resolve_agents``): an id that has a live worker of its own is that agent;
otherwise an alias names the agent that answers for it (by default the original UUIDs
of MELCHIOR, BALTHASAR and CASPER name the demo trio).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.session import normalize_decision

__all__ = [
    "DEFAULT_ALIASES",
    "INVALID_JSON",
    "OriginalReplies",
    "alias_targets",
    "message_received",
    "parse_aliases",
    "resolve_agents",
    "voters_frame",
]

#: The original system's agent UUIDs, and the demo agents that answer for them.
DEFAULT_ALIASES: Final[Mapping[str, str]] = {
    "d37c1cc8-bcc4-4b73-9f49-a93a30971f2c": "melchior",
    "6634d0ec-d700-4a92-9066-4960a0f11927": "balthasar",
    "89cbe912-25d0-47b0-97da-b25622bfac0d": "casper",
}
#: What ``get_voters`` says of the demo trio (the original frontend shows these).
_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "melchior": "MELCHIOR-1, the scientist",
    "balthasar": "BALTHASAR-2, the mother",
    "casper": "CASPER-3, the woman",
}
#: Bytes an ``agent_response`` may add to a stored frame besides its request_id (field
#: names, status, timestamp, an agent id of up to 64 characters, the session id).
_FRAME_OVERHEAD: Final = 320
_TAGS: Final[Mapping[str, str]] = {
    "approve": "<decision>POSITIVE</decision>",
    "reject": "<decision>NEGATIVE</decision>",
}

#: The original gateway's answer to a frame that is not JSON (``code`` added, as every error has).
INVALID_JSON: Final = orjson.dumps({"error": "Invalid JSON format", "code": "invalid_json"})


def parse_aliases(text: str) -> dict[str, str]:
    """``alias=agent,alias=agent`` (the ``AGENT_ALIASES`` setting) as a mapping."""
    aliases: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        alias, sep, agent = item.partition("=")
        if not sep or not alias.strip() or not agent.strip():
            raise ValueError(f"{item.strip()!r} is not of the form alias=agent")
        aliases[alias.strip()] = agent.strip()
    return aliases


def alias_targets(agent_ids: Iterable[AgentId], aliases: Mapping[str, str]) -> list[AgentId]:
    """The agents aliased by ``agent_ids`` that are not among them: whose liveness
    ``resolve_agents`` needs besides the ids' own."""
    wanted = list(agent_ids)
    targets = [AgentId(aliases[a]) for a in wanted if a in aliases]
    return [t for t in dict.fromkeys(targets) if t not in wanted]


def resolve_agents(
    agent_ids: Sequence[AgentId], aliases: Mapping[str, str], live: Mapping[AgentId, int]
) -> tuple[AgentId, ...]:
    """The agents that answer for ``agent_ids``: an id with a live worker is itself (an
    alias never hides a live agent: a bridge may serve the original UUIDs); one without
    is its alias's agent, if it has an alias. Two ids that end up one agent stay apart
    (the later keeps its own id), so every requested id still gets its own final."""
    resolved: list[AgentId] = []
    for agent_id in agent_ids:
        target = aliases.get(agent_id)
        if target is None or live.get(agent_id, 0) > 0:
            resolved.append(agent_id)
        else:
            resolved.append(AgentId(target))
    seen: set[AgentId] = set()
    for index, agent_id in enumerate(resolved):
        if agent_id in seen or (agent_id != agent_ids[index] and agent_id in agent_ids):
            resolved[index] = agent_ids[index]
        seen.add(resolved[index])
    return tuple(resolved)


def message_received(message_type: str) -> bytes:
    """The original gateway's acknowledgement of every client message it accepted."""
    return orjson.dumps({"type": "message_received", "message_type": message_type})


def voters_frame(live: Mapping[AgentId, int], aliases: Mapping[str, str], request_id: str | None) -> bytes:
    """``get_voters_response``: the agents with live workers, each under the id the
    original clients know it by (its alias, when it has one and that id is not live)."""
    known = {target: alias for alias, target in reversed(list(aliases.items()))}
    voters = []
    for agent_id in live:
        alias = known.get(agent_id)
        shown = alias if alias is not None and alias not in live else agent_id
        voters.append(
            {"agent_id": shown, "name": agent_id.upper(), "description": _DESCRIPTIONS.get(agent_id, "")}
        )
    return orjson.dumps(
        {"type": "get_voters_response", "request_id": request_id, "status": "success", "voters": voters}
    )


@dataclass(frozen=True, slots=True)
class OriginalReplies:
    """How one session's frames look to a client of the original system.

    ``agents`` maps each agent that answers to the id the client asked for; ``meta`` /
    ``from_meta`` store this in the session's Redis metadata, so any instance that
    delivers the session (``resume``) answers in the same dialect.
    """

    session_id: SessionId
    request_id: str | None
    agents: Mapping[str, str]
    #: A digest of each agent's streamed text so far, in this delivery (see ``_final``).
    _streamed: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def for_request(
        cls,
        session_id: SessionId,
        request_id: str | None,
        resolved: Sequence[AgentId],
        requested: Sequence[AgentId],
    ) -> OriginalReplies:
        """The dialect of a session whose ``requested`` ids resolved to ``resolved``."""
        return cls(session_id, request_id, dict(zip(resolved, requested, strict=True)))

    @property
    def growth(self) -> tuple[int, int]:
        """At most how many more frames, and bytes, ``translate`` makes of one stored frame
        (the fields it adds, per frame; a final's decision tag)."""
        agents = max(len(self.agents), 2)
        request_id = len(orjson.dumps(self.request_id))
        return agents - 1, agents * (_FRAME_OVERHEAD + request_id) + len(_TAGS["approve"])

    def meta(self) -> bytes:
        """The value of the session's ``dialect`` metadata field."""
        return orjson.dumps({"dialect": "original", "request_id": self.request_id, "agents": self.agents})

    @classmethod
    def from_meta(cls, session_id: SessionId, value: bytes | None) -> OriginalReplies | None:
        """The dialect stored by ``meta``; None for a seed-protocol session (no value)."""
        if not value:
            return None
        stored = orjson.loads(value)
        return cls(session_id, stored.get("request_id"), stored.get("agents", {}))

    def translate(self, kind: bytes, frame: bytes, now: float) -> list[bytes]:
        """The frames the client gets for one stored frame of type ``kind`` (``now``: UNIX
        seconds, their ``timestamp``)."""
        message: dict[str, Any] = orjson.loads(frame)
        seq: int = message["seq"]
        if kind == b"agent_judgement_stream":
            thinking = message.get("data", {}).get("thinking")
            if not isinstance(thinking, str):
                return []
            agent_id = message["agent_id"]
            self._streamed.setdefault(agent_id, hashlib.sha256()).update(thinking.encode())
            return [self._response(agent_id, "streaming", seq, now, content=thinking)]
        if kind == b"agent_judgement_final":
            return self._final(message, seq, now)
        if kind == b"agent_judgement_accepted":
            return [self._response(a, "processing", seq, now) for a in message.get("agent_ids", ())]
        if kind == b"agent_judgement_complete":
            data = message.get("data", {})
            results = data.get("results", {})
            data["results"] = {self.agents.get(a, a): r for a, r in results.items()}
            return [orjson.dumps(message)]
        return [frame]

    def _final(self, message: dict[str, Any], seq: int, now: float) -> list[bytes]:
        agent_id = message["agent_id"]
        data = message.get("data", {})
        if message.get("result_code") != 0:
            error = data.get("error")
            text = (
                error
                if isinstance(error, str)
                else f"Agent failed (result_code {message.get('result_code')})"
            )
            return [self._response(agent_id, "error", seq, now, error=text)]
        judgement = data.get("judgement")
        content = judgement if isinstance(judgement, str) else ""
        streamed = self._streamed.pop(agent_id, None)
        tag = _TAGS.get(normalize_decision(data.get("decision")) or "")
        if tag is not None and "<decision>" in content:
            tag = None  # the text carries its verdict already
        if (
            content
            and streamed is not None
            and streamed.digest() == hashlib.sha256(content.encode()).digest()
        ):
            content = ""  # the client has it: this delivery streamed exactly that text
        if tag is not None:
            content = f"{content}\n{tag}" if content else tag
        replies = [self._response(agent_id, "streaming", seq, now, content=content)] if content else []
        replies.append(self._response(agent_id, "completed", seq, now))
        return replies

    def _response(self, agent_id: str, status: str, seq: int, now: float, **fields: str) -> bytes:
        return orjson.dumps(
            {
                "type": "agent_response",
                "session_id": self.session_id,
                "request_id": self.request_id,
                "agent_id": self.agents.get(agent_id, agent_id),
                "status": status,
                "timestamp": now,
                **fields,
                "seq": seq,
            }
        )
