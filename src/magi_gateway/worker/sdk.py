"""The worker SDK: write an agent as an async function or a class.

::

    from magi_gateway import Context, Judgement, agent

    @agent("echo")
    async def echo(user_input: str, ctx: Context) -> Judgement:
        await ctx.think(f"Reading {user_input!r}")
        return Judgement("Looks fine to me", decision="approve")

Run it with ``magi-gateway agent mymodule:echo``. Raise ``AgentError("text")`` to fail
a judgement with a message the client sees (``result_code`` 1); any other exception
is logged by the worker and reported to the client without its text.

Output limits: ``ctx.think`` cuts thinking longer than ``MAX_CHUNK_BYTES`` (encoded) into
several stream messages, between code points; a final larger than ``MAX_FINAL_BYTES``, or
one that cannot be encoded as JSON, reaches the client as ``result_code`` 1 (the worker
checks it before writing, so it is not retried).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from magi_gateway.core.errors import AgentError
from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.core.output_limits import split_thinking
from magi_gateway.core.protocol import AGENT_ID_PATTERN
from magi_gateway.core.session import normalize_decision

__all__ = [
    "Agent",
    "AgentUnavailable",
    "Context",
    "FunctionAgent",
    "Judgement",
    "JudgementClosed",
    "agent",
    "declared_aliases",
]


@dataclass(frozen=True)
class Judgement:
    """An agent's answer: its text and, optionally, ``approve``/``reject``/``abstain``."""

    text: str
    decision: str | None = None
    #: Extra JSON-serialisable fields added to the final's ``data``.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        """The ``data`` object of the ``agent_judgement_final`` message."""
        data: dict[str, Any] = {"judgement": self.text, **self.extra}
        decision = normalize_decision(self.decision)
        if decision is not None:
            data["decision"] = decision
        return data


class AgentUnavailable(AgentError):
    """Raised by an agent whose backend cannot take the request: ``result_code`` 3, not 1."""


class JudgementClosed(Exception):
    """The session no longer accepts this agent's output (final given, timed out, gone)."""


#: Takes one piece of thinking; False once the session refused this agent's output.
ThinkSink = Callable[[str], Awaitable[bool]]
#: Whether the session refused this agent's output because the client cancelled it.
CancelCheck = Callable[[], Awaitable[bool]]


async def _never_cancelled() -> bool:
    return False


class Context:
    """What an agent knows of the request it is judging, and how it streams thoughts."""

    def __init__(
        self,
        *,
        session_id: SessionId,
        agent_id: AgentId,
        appid: AppId,
        deadline: float,
        sink: ThinkSink,
        was_cancelled: CancelCheck = _never_cancelled,
        max_chunk_bytes: int = 64 * 1024,
        request_fields: bytes = b"",
    ) -> None:
        self.session_id = session_id
        self.agent_id = agent_id
        self.appid = appid
        #: UNIX time after which the gateway gives this agent a timeout final.
        self.deadline = deadline
        self._sink = sink
        self._was_cancelled = was_cancelled
        self._max_chunk_bytes = max_chunk_bytes
        self._closed = False
        self._cancelled = False
        self._request_fields = request_fields

    @property
    def request_fields(self) -> dict[str, Any]:
        """The client frame's fields besides the agents and the input (``request_id``,
        ``request``, ``timestamp``, ...), as the client sent them; {} when none."""
        if not self._request_fields:
            return {}
        fields = orjson.loads(self._request_fields)
        return fields if isinstance(fields, dict) else {}

    @property
    def closed(self) -> bool:
        """True once the session stopped accepting this agent's output."""
        return self._closed

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled the session (the runner then cancels the agent)."""
        return self._cancelled

    def cancel(self) -> None:
        """Mark the judgement cancelled by the client; called by the runner."""
        self._cancelled = True
        self._closed = True

    async def think(self, text: str) -> None:
        """Stream a thinking chunk to the client (``agent_judgement_stream``).

        The chunk is queued for the worker to write, so this returns without waiting
        for Redis (it waits only while this agent's queue is full). Text over
        ``MAX_CHUNK_BYTES`` goes as several consecutive messages. Raises
        ``JudgementClosed`` when the session no longer wants this agent's output: past
        the deadline at once, otherwise once a chunk was refused (so the call after
        it); the runner then stops the agent quietly. When that is because the client
        cancelled the session, it raises ``asyncio.CancelledError`` instead (and
        ``cancelled`` is true), as when the worker's cancel reaches the agent first.
        """
        if self._closed or time.time() >= self.deadline:
            self._closed = True
            self._raise_closed()
        if len(text) * 6 <= self._max_chunk_bytes:  # the common case: fits, however encoded
            pieces: Sequence[str] = (text,)
        else:
            pieces = split_thinking(text, self._max_chunk_bytes)
        for piece in pieces:
            if not await self._sink(piece):
                self._closed = True
                if await self._was_cancelled():
                    self._cancelled = True
                self._raise_closed()

    def _raise_closed(self) -> NoReturn:
        if self._cancelled:
            raise asyncio.CancelledError
        raise JudgementClosed(self.session_id)


class Agent:
    """Base class for agents: set ``name`` and implement ``judge``.

    ``setup`` and ``close`` are lifecycle hooks for what an agent keeps across
    judgements (an HTTP client, a model, a database pool): the worker awaits ``setup``
    of each agent once, before it reads any request, and ``close`` once at shutdown,
    after the running judgements are drained (or cancelled), also when the worker
    fails. ``close`` is called only if ``setup`` returned. Both do nothing by default.
    """

    name: str = ""
    #: Other ids clients may ask for this agent by (the original system's UUIDs, say): the
    #: worker declares them to every gateway. An id that an agent of its own serves stays
    #: that agent's.
    aliases: tuple[str, ...] = ()

    async def setup(self) -> None:
        """Acquire what the agent needs across judgements; called once before the first."""

    async def close(self) -> None:
        """Release what ``setup`` (or a judgement) acquired; called once at worker shutdown."""

    async def judge(self, user_input: str, ctx: Context) -> Judgement | str:
        """Judge ``user_input``; stream with ``ctx.think``; return the judgement."""
        raise NotImplementedError

    @property
    def agent_id(self) -> AgentId:
        """The validated agent id clients ask for."""
        if not AGENT_ID_PATTERN.fullmatch(self.name):
            raise ValueError(f"invalid agent name {self.name!r}")
        return AgentId(self.name)


AgentFunction = Callable[[str, Context], Awaitable[Judgement | str]]


class FunctionAgent(Agent):
    """An agent made from an async function (see ``agent``)."""

    def __init__(self, name: str, function: AgentFunction) -> None:
        self.name = name
        self.function = function

    async def judge(self, user_input: str, ctx: Context) -> Judgement | str:
        """Call the wrapped function."""
        return await self.function(user_input, ctx)


def agent(name: str) -> Callable[[AgentFunction], FunctionAgent]:
    """Decorator turning ``async def f(user_input, ctx)`` into an agent named ``name``."""

    def wrap(function: AgentFunction) -> FunctionAgent:
        made = FunctionAgent(name, function)
        _ = made.agent_id  # validate the name now, not at the first request
        return made

    return wrap


def declared_aliases(agents: Sequence[Agent]) -> dict[str, AgentId]:
    """The agents' ``aliases``, alias to agent; each a valid agent id, used once."""
    aliases: dict[str, AgentId] = {}
    names = {agent.name for agent in agents}
    for agent in agents:
        for alias in agent.aliases:
            if not AGENT_ID_PATTERN.fullmatch(alias):
                raise ValueError(f"agent {agent.name!r}: invalid alias {alias!r}")
            if alias in aliases or alias in names:
                raise ValueError(f"agent {agent.name!r}: alias {alias!r} is taken")
            aliases[alias] = agent.agent_id
    return aliases
