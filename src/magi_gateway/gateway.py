"""The gateway service: sessions of this instance, the notification listener, timeouts.

It is driven by the WebSocket endpoint (``handle_frame``, ``connect``, ``disconnect``)
and by Redis (one pub/sub subscription per process on this instance's channel). It
holds no state another instance cannot rebuild from Redis: a session's log, pending
agents and owner live there; this object keeps only delivery cursors and timers.

Shutdown, top to bottom (``stop``): stop accepting connections, close every client
with 1012, cancel timers and tracked tasks, stop the listener, close Redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from . import metrics, protocol
from ._redis import Backoff, connect, redis_errors
from ._types import AgentId, AppId, ConnectionId, InstanceId, SessionId
from .connection import Connection
from .errors import (
    CLOSE_SERVICE_RESTART,
    BackendUnavailable,
    GatewayError,
    ProtocolError,
    SessionNotFound,
    error_frame,
    internal_error_frame,
)
from .keys import Keys
from .session import DeliveryCursor, Gap, ResultCode, new_session_id
from .settings import Settings
from .store import Store, now_ms

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

_COMPLETE_PREFIX = b'{"type":"agent_judgement_complete"'
_LOOPBACK = b""  # session id part of a readiness probe notification
_EXPIRE_RETRY_MS = 1000


class _LocalSession:
    """A session this instance delivers: its connection, cursor and timeout timer."""

    __slots__ = ("connection", "cursor", "id", "lock", "timer")

    def __init__(self, session_id: SessionId, connection: Connection | None, last_seq: int):
        self.id = session_id
        self.connection = connection
        self.cursor = DeliveryCursor(last_seq)
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None


class Gateway:
    """One gateway instance."""

    def __init__(self, settings: Settings, *, redis: Redis | None = None) -> None:
        self.settings = settings
        self.instance_id = InstanceId(secrets.token_hex(8))
        self.keys = Keys(settings.redis_key_prefix)
        self.redis = redis if redis is not None else connect(settings)
        self.store = Store(
            self.redis,
            self.keys,
            retention_s=settings.session_retention_s,
            max_session_messages=settings.max_session_messages,
            request_stream_maxlen=settings.request_stream_maxlen,
        )
        self.limits = protocol.Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_agents=settings.max_agents_per_request,
            max_input_bytes=settings.max_input_bytes,
        )
        self.accepting = False
        self._sessions: dict[SessionId, _LocalSession] = {}
        self._connections: dict[ConnectionId, Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._probes: dict[bytes, asyncio.Future[None]] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for notifications and accepting connections."""
        self._listener = asyncio.create_task(self._listen(), name="magi-notifications")
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)
        except TimeoutError:
            logger.warning("Redis not reachable at startup; will keep retrying")
        self.accepting = True
        logger.info("gateway instance %s started", self.instance_id)

    async def stop(self) -> None:
        """Stop accepting, tell clients to reconnect elsewhere, drain, close Redis."""
        self.accepting = False
        for connection in list(self._connections.values()):
            connection.request_close(CLOSE_SERVICE_RESTART, "Service restart")
        for session in self._sessions.values():
            if session.timer is not None:
                session.timer.cancel()
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.redis.aclose()
        logger.info("gateway instance %s stopped", self.instance_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("task %s failed", task.get_name(), exc_info=exc)

    # -- connections -------------------------------------------------------------

    def connect(self, appid: AppId, peer: str = "") -> Connection:
        """Register a new authenticated connection and greet it."""
        connection = Connection(
            ConnectionId(secrets.token_hex(8)),
            appid,
            max_messages=self.settings.max_outbound_messages,
            peer=peer,
        )
        self._connections[connection.id] = connection
        connection.push(protocol.encode({"type": "connection_established", "connection_id": connection.id}))
        metrics.CONNECTIONS.inc()
        return connection

    def disconnect(self, connection: Connection) -> None:
        """Forget a closed connection; its sessions run on (disconnect is not cancel)."""
        self._connections.pop(connection.id, None)
        for session_id in connection.sessions:
            session = self._sessions.get(session_id)
            if session is not None and session.connection is connection:
                session.connection = None
        connection.sessions.clear()
        metrics.CONNECTIONS.dec()

    async def handle_frame(self, connection: Connection, frame: str | bytes) -> None:
        """Act on one client frame; every failure becomes an error frame, never a raise."""
        try:
            message = protocol.parse_client_frame(frame, self.limits)
            await self._dispatch(connection, message)
        except GatewayError as exc:
            metrics.CLIENT_ERRORS.labels(exc.code).inc()
            connection.push(protocol.encode(error_frame(exc)))
        except Exception:
            logger.exception("unexpected error handling a frame on %s", connection.id)
            metrics.CLIENT_ERRORS.labels("internal_error").inc()
            connection.push(protocol.encode(internal_error_frame()))

    async def _dispatch(self, connection: Connection, message: protocol.ClientMessage) -> None:
        if isinstance(message, protocol.Ping):
            connection.push(b'{"type":"pong"}')
        elif isinstance(message, protocol.GetAgents):
            agents = await self.store.live_agents()
            connection.push(
                protocol.encode(
                    {
                        "type": "agents",
                        "agents": [{"agent_id": a, "workers": n} for a, n in agents.items()],
                    }
                )
            )
        elif isinstance(message, protocol.JudgementRequest):
            await self.open_judgement(connection, message)
        elif isinstance(message, protocol.Resume):
            await self.attach(connection, message.session_id, message.last_seq)
        else:
            raise ProtocolError("cancel is not supported by this gateway version", code="unsupported")

    # -- sessions ----------------------------------------------------------------

    async def open_judgement(self, connection: Connection, request: protocol.JudgementRequest) -> None:
        """Start a session: log it, answer missing agents at once, queue the others."""
        session_id = new_session_id()
        appid = connection.appid
        timeout_ms = int(self.settings.judgement_timeout_s * 1000)
        if request.request_id is not None:
            existing = await self.store.claim_request_id(
                appid,
                request.request_id,
                session_id,
                timeout_ms + self.settings.session_retention_s * 1000,
            )
            if existing is not None:
                # A retried request: the same session again, replayed from the start.
                await self.attach(connection, existing, 0)
                return
        deadline_ms = now_ms() + timeout_ms
        live = await self.store.live_worker_counts(request.agent_ids)
        session = self._track(session_id, connection, 0)
        try:
            await self.store.create_session(
                session_id,
                appid,
                self.instance_id,
                request.agent_ids,
                deadline_ms,
                request.request_id,
            )
        except BackendUnavailable:
            self._untrack(session)
            raise
        metrics.SESSIONS_STARTED.inc()
        for agent_id in request.agent_ids:
            if live.get(agent_id, 0) > 0:
                await self.store.enqueue_request(session_id, agent_id, request.user_input, deadline_ms, appid)
        for agent_id in request.agent_ids:
            if live.get(agent_id, 0) == 0:
                await self.store.append_final(
                    session_id,
                    agent_id,
                    ResultCode.NO_AGENT,
                    {"error": f"No live worker serves agent '{agent_id}'"},
                )
        self._arm_timeout(session, deadline_ms)

    async def attach(self, connection: Connection, session_id: SessionId, last_seq: int) -> None:
        """Deliver a session to ``connection``: replay after ``last_seq``, then live."""
        info = await self.store.session_info(session_id)
        if info is None or info.appid != connection.appid:
            raise SessionNotFound("Session not found or expired", session_id=session_id)
        session = self._sessions.get(session_id)
        if session is None:
            session = self._track(session_id, connection, last_seq)
        else:
            if session.connection is not None and session.connection is not connection:
                session.connection.sessions.discard(session_id)
            session.connection = connection
            connection.sessions.add(session_id)
            session.cursor = DeliveryCursor(last_seq)
        if info.owner != self.instance_id and not info.completed:
            await self.store.set_owner(session_id, self.instance_id)
            self._arm_timeout(session, info.deadline_ms)
        async with session.lock:
            for seq, frame in await self.store.read_log(session_id, last_seq + 1):
                self._push(session, seq, frame)
        if info.completed:
            self._untrack(session)

    def _track(self, session_id: SessionId, connection: Connection, last_seq: int) -> _LocalSession:
        session = _LocalSession(session_id, connection, last_seq)
        self._sessions[session_id] = session
        connection.sessions.add(session_id)
        return session

    def _untrack(self, session: _LocalSession) -> None:
        if session.timer is not None:
            session.timer.cancel()
        self._sessions.pop(session.id, None)
        if session.connection is not None:
            session.connection.sessions.discard(session.id)

    def _arm_timeout(self, session: _LocalSession, deadline_ms: int) -> None:
        if session.timer is not None:
            session.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(deadline_ms - now_ms(), 0) / 1000
        session.timer = loop.call_later(delay, self._on_deadline, session.id)

    def _on_deadline(self, session_id: SessionId) -> None:
        self._spawn(self._expire(session_id), f"timeout-{session_id}")

    async def _expire(self, session_id: SessionId) -> None:
        """Give every agent still pending at the deadline a timeout final."""
        error = f"Agent did not answer within {self.settings.judgement_timeout_s:g}s"
        try:
            info = await self.store.session_info(session_id)
            if info is None or info.completed:
                self._forget(session_id)
                return
            for agent_id in info.agent_ids:
                if agent_id in info.pending:
                    await self.store.append_final(session_id, agent_id, ResultCode.TIMEOUT, {"error": error})
        except BackendUnavailable:
            # Redis is down: try again shortly; finals are deduplicated, so retrying is safe.
            session = self._sessions.get(session_id)
            if session is not None:
                self._arm_timeout(session, now_ms() + _EXPIRE_RETRY_MS)

    def _forget(self, session_id: SessionId) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._untrack(session)

    # -- delivery ----------------------------------------------------------------

    def _push(self, session: _LocalSession, seq: int, frame: bytes) -> None:
        session.cursor.sent(seq)
        if session.connection is not None:
            session.connection.push(frame)
            metrics.MESSAGES_OUT.inc()
        if frame.startswith(_COMPLETE_PREFIX):
            self._untrack(session)

    async def _deliver(self, session_id: SessionId, seq: int, frame: bytes) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        if not session.lock.locked():
            offer = session.cursor.offer(seq)
            if offer is True:
                self._push(session, seq, frame)
                return
            if offer is False:
                return
        async with session.lock:
            offer = session.cursor.offer(seq)
            if isinstance(offer, Gap):
                for missing_seq, missing in await self.store.read_log(session_id, offer.first, offer.last):
                    self._push(session, missing_seq, missing)
                offer = session.cursor.offer(seq)
            if offer is True:
                self._push(session, seq, frame)

    async def _catch_up(self) -> None:
        """After a subscription outage, deliver what was logged meanwhile."""
        for session in list(self._sessions.values()):
            async with session.lock:
                for seq, frame in await self.store.read_log(session.id, session.cursor.last_seq + 1):
                    self._push(session, seq, frame)

    async def _listen(self) -> None:
        """Receive this instance's notifications, reconnecting with backoff."""
        backoff = Backoff(self.settings.redis_backoff_base_s, self.settings.redis_backoff_cap_s)
        channel = self.keys.gateway_channel(self.instance_id)
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                with redis_errors():
                    await pubsub.subscribe(channel)
                if backoff.failures:
                    metrics.REDIS_RECONNECTS.inc()
                    logger.info("notification subscription restored")
                    await self._catch_up()
                backoff.reset()
                self._subscribed.set()
                while True:
                    with redis_errors():
                        message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._on_notification(message["data"])
            except BackendUnavailable as exc:
                self._subscribed.clear()
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    logger.warning("notification subscription lost (%s); retrying", exc.__cause__)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _on_notification(self, data: bytes) -> None:
        session_part, seq_part, frame = data.split(b"\n", 2)
        if session_part == _LOOPBACK:
            probe = self._probes.pop(frame, None)
            if probe is not None and not probe.done():
                probe.set_result(None)
            return
        await self._deliver(SessionId(session_part.decode()), int(seq_part), frame)

    # -- readiness ---------------------------------------------------------------

    async def live_agents(self) -> dict[AgentId, int]:
        """Agents with live workers (for ``get_agents`` and the console)."""
        return await self.store.live_agents()

    async def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether a Redis round trip and a notification loopback both work now."""
        if not self.accepting or not self._subscribed.is_set():
            return False
        token = secrets.token_hex(8).encode()
        probe: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[token] = probe
        try:
            with redis_errors():
                await self.redis.publish(self.keys.gateway_channel(self.instance_id), b"\n0\n" + token)
            await asyncio.wait_for(probe, timeout_s)
            return True
        except (BackendUnavailable, TimeoutError):
            return False
        finally:
            self._probes.pop(token, None)
