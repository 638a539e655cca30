"""The Redis side of sessions, requests and worker liveness, shared by gateway and workers.

A session's log is written only through the script ``lua/append.lua``, which in one
atomic step allocates the next seq, joins the frame's head and tail (both built by
``core.frames``) around it, stores it under stream id ``0-SEQ``, refreshes expiries,
and publishes it once to each gateway instance with viewers of the session
(``redis.viewers``). Finals are deduplicated there (one per agent, whoever writes
first: worker, timeout or cancel); the writer of the last final also writes the
``agent_judgement_complete`` message, guarded so it exists once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson

from magi_gateway._util import now_ms
from magi_gateway.core import frames
from magi_gateway.core.errors import BackendCommandError, GatewayError
from magi_gateway.core.frames import SessionFrameType
from magi_gateway.core.ids import AgentId, AppId, ConnectionId, InstanceId, SessionId
from magi_gateway.core.notification import notify_prefix
from magi_gateway.core.session import ResultCode, compute_verdict, normalize_decision
from magi_gateway.redis.chunks import ChunkWriter
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.coalesce import CoalescedScript
from magi_gateway.redis.deadlines import Deadlines
from magi_gateway.redis.idempotency import RequestIds
from magi_gateway.redis.intake import AppLimits, Intake, PendingIntake
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.liveness import REQUEST_STREAM_TTL_MS, AgentStats, Liveness
from magi_gateway.redis.opening import claim_and_count, claims_in_admission, open_session
from magi_gateway.redis.signals import Signals
from magi_gateway.redis.viewers import Viewers, viewer_entry

__all__ = ["REQUEST_STREAM_TTL_MS", "AgentStats", "AppendResult", "SessionInfo", "Store"]

#: The one write path of every session message (see the script's header).
_APPEND_LUA = files("magi_gateway.redis").joinpath("lua/append.lua").read_text(encoding="utf-8")

# Negative codes returned by _APPEND_LUA, by meaning.
_GONE, _COMPLETED, _NOT_PENDING, _FULL, _STILL_PENDING = -1, -2, -3, -4, -5


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of appending a message: its seq, or None when it was not written."""

    seq: int | None
    #: True when this append wrote the session's last final (and so its completion).
    completed: bool = False


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What Redis knows of a session."""

    session_id: SessionId
    appid: AppId
    agent_ids: tuple[AgentId, ...]
    #: The instance that opened the session.
    owner: InstanceId | None
    deadline_ms: int
    completed: bool
    pending: frozenset[AgentId]
    dialect: bytes = b""  # its replies' dialect (core.dialect.OriginalReplies.meta); b"": the seed one


class Store:
    """Session and request operations on one Redis client; ``liveness`` for workers and agents."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        retention_s: int = 600,
        max_session_messages: int = 10_000,
        request_stream_maxlen: int = 100_000,
        app_limits: AppLimits | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        #: Heartbeats, live workers, agent queues.
        self.liveness = Liveness(redis, keys)
        self.retention_ms = retention_s * 1000
        #: Clients' request_ids and the sessions they started.
        self.request_ids = RequestIds(redis, keys, retention_ms=self.retention_ms)
        self.max_session_messages = max_session_messages
        self.request_stream_maxlen = request_stream_maxlen
        #: Sessions per appid (running, opened per second), across every instance.
        self.app_limits = app_limits or AppLimits()
        #: Queueing a new session's requests exactly once.
        self.intake = Intake(redis, keys, request_stream_maxlen=request_stream_maxlen)
        self._append = redis.register_script(_APPEND_LUA)
        #: Its calls from many tasks (finals, completions), sharing round trips.
        self._append_calls = CoalescedScript(redis, self._append)
        #: The shared deadline set (the sweep) and each appid's running sessions.
        self.deadlines = Deadlines(redis, keys)
        #: Publications: cancels for workers, readiness probes, admin answers.
        self.signals = Signals(redis, keys)
        #: Thinking chunks, many per round trip.
        self.chunks = ChunkWriter(redis, keys)
        #: The connections following each session (where its messages are published).
        self.viewers = Viewers(redis, keys)

    # -- sessions --------------------------------------------------------------

    async def create_session(
        self,
        session_id: SessionId,
        appid: AppId,
        owner: InstanceId,
        agent_ids: Sequence[AgentId],
        deadline_ms: int,
        request_id: str | None,
        *,
        intake: PendingIntake | None = None,
        viewer: ConnectionId | None = None,
        viewer_lease_ms: int = 30_000,
        dialect: bytes = b"",
        enqueue: bool = False,
        claim: tuple[str, int] | None = None,
    ) -> bool:
        """Create the session's keys and write ``agent_judgement_accepted`` (seq 1), in one
        script call: a session never exists without its first message (a gateway killed
        between two steps used to leave one that a retried request was answered by, but
        whose client never saw it accepted). The appid's limits are checked first
        (``TooManySessions``, ``RateLimited``), with the deadline and ``intake`` (the
        requests to queue) written in that check: a session that exists is always swept
        at its deadline, and its requests queued even if the caller fails before
        ``intake.enqueue``. ``viewer``, the opening connection (on ``owner``), is the
        session's first viewer (``redis.viewers``). ``enqueue``: queue the requests too,
        on one server in the same round trip (``redis.opening``); True when this did.
        ``claim``: bind ``request_id`` (for that many ms) in the admission, unless it names
        another session (``RequestClaimed``, nothing written); where ``claims_with_opening``.
        """
        ttl_ms = max(deadline_ms - now_ms(), 0) + self.retention_ms
        limits = self.app_limits
        admission = self.intake.admit_call(session_id, appid, deadline_ms, ttl_ms, intake, limits, claim)
        meta: dict[str, str | int | bytes] = {
            "appid": appid,
            "owner": owner,
            "agents": orjson.dumps(list(agent_ids)),
            "deadline_ms": deadline_ms,
            "request_id": request_id or "",
            "ttl_ms": ttl_ms,
            "retention_ms": self.retention_ms,
            "max_msgs": self.max_session_messages,
            **({"dialect": dialect} if dialect else {}),  # with the session: any instance resumes in it
        }
        tail = frames.accepted_tail(tuple(agent_ids), request_id)
        fields: list[str | int | bytes] = [item for pair in meta.items() for item in pair]
        opener = [viewer_entry(owner, viewer) if viewer else "", viewer_lease_ms, len(fields)]
        args = [*self._append_args(session_id, "create", "agent_judgement_accepted", tail, ""), *opener]
        keys, argv = self.keys.session(session_id).all(), [*args, *fields, *agent_ids]
        reply, queued = await open_session(
            self.redis, self.intake, self._append, admission, (keys, self.keys.deadlines), argv,
            intake if enqueue else None, self.app_limits,
        )  # fmt: skip
        if reply[0] < 0:  # session ids are random: an existing one is a defect, not a retry
            raise BackendCommandError(f"session {session_id} not created ({reply[0]})")
        return queued

    @property
    def claims_with_opening(self) -> bool:
        """Whether ``create_session`` can ``claim`` a request_id: on one server (``redis.opening``)."""
        return claims_in_admission(self.redis)

    async def claim_and_count(
        self, appid: AppId, request_id: str | None, sid: SessionId, ttl_ms: int, agents: Sequence[AgentId]
    ) -> tuple[SessionId | None, dict[AgentId, int], dict[str, AgentId]]:
        """A judgement's first round trip (``redis.opening.claim_and_count``)."""
        return await claim_and_count(
            self.redis, self.request_ids, self.liveness, appid, request_id, sid, ttl_ms, agents
        )

    async def session_info(self, session_id: SessionId) -> SessionInfo | None:
        """The session's metadata, or None when unknown or expired."""
        keys = self.keys.session(session_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta)
                pipe.smembers(keys.pending)
                meta, pending = await pipe.execute()
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode()
        return SessionInfo(
            session_id=session_id,
            appid=AppId(meta[b"appid"].decode()),
            agent_ids=tuple(AgentId(a) for a in orjson.loads(meta[b"agents"])),
            owner=InstanceId(owner) if owner else None,
            deadline_ms=int(meta[b"deadline_ms"]),
            completed=b"completed" in meta,
            pending=frozenset(AgentId(a.decode()) for a in pending),
            dialect=meta.get(b"dialect", b""),
        )

    async def result_code(self, session_id: SessionId, agent_id: AgentId) -> ResultCode | None:
        """The ``result_code`` of the agent's final, or None while it has none (or the session is gone)."""
        with redis_errors():
            summary: Any = await self.redis.hget(self.keys.session(session_id).results, agent_id)
        return None if summary is None else ResultCode(orjson.loads(summary)["result_code"])

    async def read_log(
        self, session_id: SessionId, first_seq: int, last_seq: int | None = None, *, count: int | None = None
    ) -> list[tuple[int, bytes, bytes]]:
        """Stored ``(seq, type, frame)`` with ``first_seq <= seq <= last_seq`` (to the end when None),
        at most ``count``."""
        end = "+" if last_seq is None else f"0-{last_seq}"
        with redis_errors():
            entries: Any = await self.redis.xrange(
                self.keys.session(session_id).log, f"0-{first_seq}", end, count=count
            )
        return [
            (int(entry_id.split(b"-")[1]), fields.get(b"t", b"other"), fields[b"f"])
            for entry_id, fields in entries
        ]

    async def _run_append(
        self,
        session_id: SessionId,
        mode: str,
        message_type: SessionFrameType,
        tail: bytes,
        agent_id: str = "",
        result: bytes = b"",
        before: Sequence[tuple[Any, ...]] = (),
    ) -> list[Any]:
        args = self._append_args(session_id, mode, message_type, tail, agent_id, result)
        reply: list[Any] = await self._append_calls(self.keys.session(session_id).all(), args, before=before)
        return reply

    def _append_args(
        self,
        session_id: SessionId,
        mode: str,
        message_type: SessionFrameType,
        tail: bytes,
        agent_id: str,
        result: bytes = b"",
    ) -> list[Any]:
        """ARGV of ``lua/append.lua``, in its order."""
        return [
            mode,
            message_type,
            frames.session_head(message_type, session_id),
            tail,
            agent_id,
            result,
            self.keys.gateway_channel_prefix,
            notify_prefix(session_id),
        ]

    async def append_stream(
        self, session_id: SessionId, agent_id: AgentId, data: dict[str, Any]
    ) -> AppendResult:
        """Append a thinking chunk; dropped once the agent has its final or the log is full."""
        (outcome,) = await self.append_streams([(session_id, agent_id, frames.stream_tail(agent_id, data))])
        if isinstance(outcome, GatewayError):
            raise outcome
        return outcome

    async def append_streams(
        self, chunks: Sequence[tuple[SessionId, AgentId, bytes]]
    ) -> list[AppendResult | GatewayError]:
        """Append encoded chunks (``frames.stream_tail``) in one round trip, in order.

        One outcome per chunk, so a failure fails only its own session's chunks (see
        ``ChunkWriter.append_runs``, which workers call with runs of chunks).
        """
        outcomes = await self.chunks.append_runs([(sid, agent, (tail,)) for sid, agent, tail in chunks])
        return [
            outcome if isinstance(outcome, GatewayError) else AppendResult(max(outcome[0], 0) or None)
            for outcome in outcomes
        ]

    async def append_final(
        self,
        session_id: SessionId,
        agent_id: AgentId,
        result_code: ResultCode,
        data: dict[str, Any],
        *,
        clear_deadline: bool = True,
    ) -> AppendResult:
        """Append the agent's final unless it has one; complete the session after the last.

        ``clear_deadline=False`` leaves taking a session this call completed out of the
        deadline sweep to the caller (``AppendResult.completed``; workers batch it with
        their acks); the sweep does it anyway once the deadline passes.
        """
        summary: dict[str, Any] = {"result_code": int(result_code)}
        decision = normalize_decision(data.get("decision"))
        if decision is not None:
            summary["decision"] = decision
        result = orjson.dumps(summary)
        reply = await self._run_append(
            session_id,
            "final",
            "agent_judgement_final",
            frames.final_tail(agent_id, int(result_code), data),
            agent_id,
            result,
        )
        if reply[0] == _NOT_PENDING:
            # This agent's final is in already; the call that wrote it may have failed
            # before the completion (or its reply was lost and this is the retry).
            await self.complete_if_done(session_id)
        if reply[0] < 0:
            return AppendResult(None)
        if reply[1] != 0:
            return AppendResult(reply[0])
        completed = await self._complete(session_id, reply[2:5], clear_deadline)
        return AppendResult(reply[0], completed=completed)

    async def complete_if_done(self, session_id: SessionId) -> bool:
        """Write the completion of a session whose agents all have finals, if it is missing.

        The last final and the completion are two script calls: this repairs a session
        left between them (by the final path and by the deadline sweep). True when this
        call wrote the completion.
        """
        keys = self.keys.session(session_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.meta, "agents")
                pipe.hexists(keys.meta, "completed")
                pipe.scard(keys.pending)
                pipe.hgetall(keys.results)
                pipe.hget(keys.meta, "appid")
                agents, completed, pending, results, appid = await pipe.execute()
        if agents is None or completed or pending:
            return False
        flat = [part for item in results.items() for part in item]
        return await self._complete(session_id, (agents, flat, appid))

    async def _complete(self, session_id: SessionId, last: Sequence[Any], clear: bool = True) -> bool:
        """Write ``agent_judgement_complete`` (once: the script refuses a second); ``last``:
        the session's agents (JSON), results (flat) and appid. It stops counting as running
        first, in the same round trip (its client may open the next session at once), and
        stays in the deadline sweep until after, so a failure in between still ends with a
        completion."""
        agents, flat, appid = orjson.loads(last[0]), last[1], last[2]
        by_agent = {flat[i].decode(): orjson.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
        results = {a: by_agent[a] for a in agents if a in by_agent}
        tail = frames.complete_tail(compute_verdict(r.get("decision") for r in results.values()), results)
        app = AppId(appid.decode()) if appid else None
        before = self.deadlines.stop_running_command(app, session_id) if app else ()
        done = await self._run_append(session_id, "complete", "agent_judgement_complete", tail, before=before)
        if done[0] > 0 and clear:
            await self.deadlines.clear(session_id, app)
        return bool(done[0] > 0)

    async def finish_pending(self, info: SessionInfo, result_code: ResultCode, data: dict[str, Any]) -> None:
        """Give every agent still pending in ``info`` a final (in request order)."""
        for agent_id in info.agent_ids:
            if agent_id in info.pending:
                await self.append_final(info.session_id, agent_id, result_code, data)

    # -- requests ----------------------------------------------------------------

    async def enqueue_request(
        self,
        session_id: SessionId,
        agent_id: AgentId,
        user_input: str,
        deadline_ms: int,
        appid: AppId,
        extra: bytes = b"",
    ) -> None:
        """Add a request to the agent's stream for ``appid``, outside any intake mark."""
        intake = PendingIntake(session_id, appid, (agent_id,), user_input, deadline_ms, extra)
        await self.intake.enqueue(intake, marked=False)
