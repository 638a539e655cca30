"""Session operations a client asks for: open a judgement, attach (resume), cancel.

The state machine of each delivery is the core's (``core.delivery``), the order of a
judgement's steps too (``core.session.plan_judgement``); this module runs those
steps against Redis. A session's truth is in Redis: its log, pending agents, viewers
and deadline; attaching a connection to a session registers it as one more viewer (so
the session's notifications reach this instance too) and starts a replay from the
client's cursor. Other viewers, here or elsewhere, go on as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from magi_gateway._util import now_ms
from magi_gateway.core import frames, protocol
from magi_gateway.core.dialect import OriginalReplies, alias_targets, message_received, resolve_agents
from magi_gateway.core.errors import (
    BackendCommandError,
    BackendUnavailable,
    GatewayError,
    RateLimited,
    SessionNotFound,
    TooManySessions,
    TooManyViewers,
)
from magi_gateway.core.ids import AgentId, AppId, ConnectionId, InstanceId, SessionId
from magi_gateway.core.live_agents import LiveAgents, Liveness
from magi_gateway.core.session import ResultCode, new_session_id, plan_judgement
from magi_gateway.logs import session_id_var
from magi_gateway.redis.intake import PendingIntake, RequestClaimed
from magi_gateway.redis.store import SessionInfo, Store
from magi_gateway.server import metrics
from magi_gateway.server.delivery import Delivery
from magi_gateway.server.dialect import OriginalTranslation, translation_for
from magi_gateway.server.outbox import Connection
from magi_gateway.settings import Settings

__all__ = ["SessionOps", "Watch"]

logger = logging.getLogger(__name__)

#: A duplicate request_id can arrive while the first is still creating its session.
_CREATION_WAIT_POLLS = 20
_CREATION_WAIT_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Watch:
    """A connection following the session being opened: registered as its first viewer."""

    viewer: ConnectionId
    #: The session was not created: stop delivering it.
    undo: Callable[[], None]
    #: It was, with the viewer registered.
    created: Callable[[], None]


class SessionOps:
    """Opens, attaches and cancels sessions for this instance's connections."""

    def __init__(self, settings: Settings, store: Store, delivery: Delivery, instance_id: InstanceId) -> None:
        self.settings = settings
        self.store = store
        self.delivery = delivery
        self.instance_id = instance_id
        #: How long a viewer's registration lasts unless renewed (``server.viewers``).
        self.lease_ms = int(settings.viewer_lease_s * 1000)
        #: Agent aliases of ``AGENT_ALIASES`` (those workers declare override them; see
        #: ``core.dialect.resolve_agents``).
        self.aliases = settings.agent_alias_map
        #: The agents' liveness, kept ``LIVENESS_CACHE_S`` for the next judgement of the same agents.
        self.live_agents = LiveAgents(settings.liveness_cache_s)

    async def open_judgement(self, connection: Connection, request: protocol.JudgementRequest) -> None:
        """Start a session delivered to ``connection`` (a retried ``request_id``: its session
        again, replayed from seq 1)."""

        async def retried(existing: SessionId) -> None:
            await self.attach(connection, existing, 0, wait_for_creation=True, restart=True)

        def watch(session_id: SessionId, agent_ids: tuple[AgentId, ...]) -> Watch:
            translation = None
            if request.original:  # answered in the original clients' shapes
                replies = OriginalReplies.for_request(
                    session_id, request.request_id, agent_ids, request.agent_ids
                )
                translation = OriginalTranslation(connection, replies)
            started = time.monotonic()
            session = self.delivery.track(session_id, connection, 0, started=started, translation=translation)
            accepted = frames.accepted_frame(session_id, agent_ids, request.request_id)
            return Watch(
                connection.id,
                undo=lambda: self.delivery.untrack(session),
                created=lambda: self.delivery.registered(session, accepted),
            )

        await self.start_judgement(connection.appid, request, retried=retried, watch=watch)

    async def start_judgement(
        self,
        appid: AppId,
        request: protocol.JudgementRequest,
        *,
        retried: Callable[[SessionId], Awaitable[None]],
        watch: Callable[[SessionId, tuple[AgentId, ...]], Watch] | None = None,
    ) -> SessionId:
        """Start a session: log it, queue the served agents, answer the others at once.

        The WebSocket's ``agent_judgement`` and ``POST /v1/judgements`` both come here.
        ``watch(session_id, agent_ids)`` runs before the session is written (so its first
        message is delivered live; ``agent_ids``: the agents that answer, after aliases) and
        returns the connection to register as the session's first viewer, with what to do
        once it is created or if it is not; a retried
        ``request_id`` calls ``retried(existing)`` instead (``SessionNotFound`` from it: the
        earlier session has expired and the request starts afresh). Returns the session id.
        """
        session_id = new_session_id()
        session_id_var.set(session_id)
        timeout_ms = int(self.settings.judgement_timeout_s * 1000)
        retention_ms = timeout_ms + self.settings.session_retention_s * 1000
        request_id = request.request_id
        # On one server the request_id is claimed in the session's admission; a Cluster
        # claims it first, with the liveness counts (another slot).
        claim_apart = request_id is not None and not self.store.claims_with_opening
        wanted = [*request.agent_ids, *alias_targets(request.agent_ids, self.aliases)]
        liveness = None if claim_apart else self.live_agents.get(wanted, time.monotonic())
        if liveness is None:
            existing, liveness = await self._claim_and_count(
                appid, request, request_id if claim_apart else None, session_id, retention_ms, wanted
            )
            if existing is not None:
                if await self._retried(appid, request, session_id, existing, retried):
                    return existing
                claim_apart = True  # the request_id names this session now
        claim = None if request_id is None or claim_apart else (request_id, retention_ms)
        try:
            await self._open(session_id, appid, request, liveness, timeout_ms, claim, watch)
        except RequestClaimed as exc:
            if await self._retried(appid, request, session_id, exc.session_id, retried):
                return exc.session_id
            await self._open(session_id, appid, request, liveness, timeout_ms, None, watch)
        return session_id

    async def _claim_and_count(
        self,
        appid: AppId,
        request: protocol.JudgementRequest,
        request_id: str | None,
        session_id: SessionId,
        ttl_ms: int,
        wanted: list[AgentId],
    ) -> tuple[SessionId | None, Liveness]:
        """The first round trip: the agents' liveness (kept a moment, ``core.live_agents``)
        and, given ``request_id``, its claim (the session it names already, if any)."""
        requested = request.agent_ids
        try:
            existing, live, declared = await self.store.claim_and_count(
                appid, request_id, session_id, ttl_ms, wanted
            )
            aliases = {**self.aliases, **declared} if declared else self.aliases
            if uncounted := [a for a in alias_targets(requested, aliases) if a not in live]:
                # Aliases a worker declares for its agent (agents.toml): their agents' workers too.
                live = {**live, **await self.store.liveness.live_worker_counts(uncounted)}
        except BackendUnavailable:
            if request_id is not None:
                await self._release(appid, request_id, session_id)  # it may have been bound
            raise
        liveness = Liveness(live, declared)
        answering = resolve_agents(requested, aliases, live)
        self.live_agents.put(wanted, liveness, answering, time.monotonic())
        return existing, liveness

    async def _retried(
        self,
        appid: AppId,
        request: protocol.JudgementRequest,
        session_id: SessionId,
        existing: SessionId,
        retried: Callable[[SessionId], Awaitable[None]],
    ) -> bool:
        """A retried request: its session again, replayed from the start (True), unless it
        has expired meanwhile (False: the request_id now names ``session_id``, to start)."""
        try:
            await retried(existing)
            return True
        except SessionNotFound:
            if request.request_id is not None:  # (always: only a request_id names a session)
                await self.store.request_ids.rebind(appid, request.request_id, session_id, existing)
            return False

    async def _open(
        self,
        session_id: SessionId,
        appid: AppId,
        request: protocol.JudgementRequest,
        liveness: Liveness,
        timeout_ms: int,
        claim: tuple[str, int] | None,
        watch: Callable[[SessionId, tuple[AgentId, ...]], Watch] | None,
    ) -> None:
        """Write the session (``claim``: bind its request_id in the admission; may raise
        ``RequestClaimed``, having written nothing), queue its requests, answer the
        agents without a worker."""
        requested = request.agent_ids
        aliases = {**self.aliases, **liveness.declared} if liveness.declared else self.aliases
        deadline_ms = now_ms() + timeout_ms
        agent_ids = resolve_agents(requested, aliases, liveness.live)
        dialect = b""
        if request.original:  # stored with the session: whoever delivers it answers in it
            dialect = OriginalReplies.for_request(session_id, request.request_id, agent_ids, requested).meta()
        watching = watch(session_id, agent_ids) if watch is not None else None
        try:
            plan = plan_judgement(agent_ids, liveness.live)
            intake = PendingIntake(
                session_id, appid, plan.queue, request.user_input, deadline_ms, request.forwarded_fields()
            )
            queued = await self.store.create_session(
                session_id,
                appid,
                self.instance_id,
                agent_ids,
                deadline_ms,
                request.request_id,
                intake=intake,
                viewer=None if watching is None else watching.viewer,
                viewer_lease_ms=self.lease_ms,
                dialect=dialect,
                enqueue=True,
                claim=claim,
            )
        except (BackendUnavailable, BackendCommandError, TooManySessions, RateLimited, RequestClaimed):
            if watching is not None:
                watching.undo()
            await self._release(appid, request.request_id, session_id)
            raise
        if watching is not None:
            watching.created()
        metrics.SESSIONS_STARTED.inc()
        try:
            if not queued:
                await self.store.intake.enqueue(intake)
            for agent_id in plan.no_worker:
                await self.store.append_final(
                    session_id,
                    agent_id,
                    ResultCode.NO_AGENT,
                    {"error": f"No live worker serves agent '{agent_id}'"},
                )
        except BackendUnavailable as exc:
            # The session is accepted: the intake repair queues its requests (any
            # instance), the deadline sweep answers the rest.
            logger.warning("session %s left to the intake repair (%s)", session_id, exc.__cause__ or exc)

    async def _release(self, appid: AppId, request_id: str | None, session_id: SessionId) -> None:
        """Unbind ``request_id`` from a session that was not created (if Redis answers)."""
        if request_id is not None:
            with contextlib.suppress(BackendUnavailable):
                await self.store.request_ids.release(appid, request_id, session_id)

    async def session_info(self, connection: Connection, session_id: SessionId, *, wait: bool) -> SessionInfo:
        """The session, if it exists and belongs to the connection's appid."""
        return await self.find_session(connection.appid, session_id, wait=wait)

    async def find_session(self, appid: AppId, session_id: SessionId, *, wait: bool) -> SessionInfo:
        """The session, if it exists and belongs to ``appid`` (``wait``: it may be being created)."""
        info = await self.store.session_info(session_id)
        for _ in range(_CREATION_WAIT_POLLS if wait else 0):
            if info is not None:
                break
            await asyncio.sleep(_CREATION_WAIT_POLL_S)
            info = await self.store.session_info(session_id)
        if info is None or info.appid != appid:
            raise SessionNotFound("Session not found or expired", session_id=session_id)
        return info

    async def attach(
        self,
        connection: Connection,
        session_id: SessionId,
        last_seq: int,
        *,
        wait_for_creation: bool = False,
        restart: bool = False,
        resuming: bool = False,
    ) -> None:
        """Deliver a session to ``connection``: replay after ``last_seq``, then live
        (``restart``: even if this connection receives it already, see ``Delivery.attach``).

        A connection not yet following a running session is registered as its viewer
        first (``TooManyViewers`` over ``max_viewers_per_session``), so no message logged
        after the replay's read goes unnotified. A completed session is only replayed:
        nothing more is published, so its readers are not counted.
        """
        info = await self.session_info(connection, session_id, wait=wait_for_creation)
        if info.dialect and resuming and not connection.client.original:
            # Resuming a session of the original dialect: the connection speaks it from
            # now on, this resume acknowledged as soon as that is known.
            connection.client.original = True
            connection.push(message_received("resume"), b"message_received")
        current = self.delivery.viewer(session_id, connection)
        registered = False
        if not info.completed and (current is None or not current.registered):
            await self.store.viewers.join(
                session_id,
                self.instance_id,
                connection.id,
                max_viewers=self.settings.max_viewers_per_session,
                lease_ms=self.lease_ms,
            )
            registered = True
        # The replay runs as a task, paced by the connection's buffer, and hands over to
        # live delivery once it has caught up with the log; a session this connection
        # receives already is not delivered twice.
        translation = translation_for(connection, session_id, info.dialect) if info.dialect else None
        self.delivery.attach(
            session_id, connection, last_seq, restart=restart, registered=registered, translation=translation
        )

    async def resume(self, connection: Connection, message: protocol.Resume) -> None:
        """``resume``: attach, counting the outcome."""
        try:
            await self.attach(connection, message.session_id, message.last_seq, resuming=True)
        except SessionNotFound:
            metrics.RESUMES.labels("not_found").inc()
            raise
        except TooManyViewers:
            metrics.RESUMES.labels("too_many_viewers").inc()
            raise
        except BaseException:
            metrics.RESUMES.labels("error").inc()
            raise
        metrics.RESUMES.labels("ok").inc()

    async def cancel(self, connection: Connection, session_id: SessionId) -> None:
        """Give every pending agent a cancelled final and tell the workers to stop."""
        await self.cancel_session(connection.appid, session_id)

    async def cancel_session(self, appid: AppId, session_id: SessionId) -> None:
        """``cancel`` for ``appid`` (the WebSocket's and ``POST /v1/sessions/{id}/cancel``)."""
        info = await self.find_session(appid, session_id, wait=False)
        if info.completed:
            raise GatewayError("Session already complete", code="session_completed", session_id=session_id)
        await self.store.finish_pending(info, ResultCode.CANCELLED, {"error": "Cancelled by the client"})
        await self.store.signals.announce_cancel(session_id)
