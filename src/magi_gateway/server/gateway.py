"""The gateway service: sessions of this instance, the notification listener, timeouts.

It is driven by the WebSocket endpoint (``handle_frame``, ``connect``, ``disconnect``)
and by Redis (one pub/sub subscription per process on this instance's channel). It
holds no state another instance cannot rebuild from Redis: a session's log, pending
agents, owner and deadline live there; this object keeps only the delivery cursors
of the sessions its connections watch. Timeouts are enforced by a sweep of the
shared deadline set that every instance runs, so they fire even when the instance
that started a session is gone.

Shutdown, top to bottom (``stop``): stop accepting connections, close every client
with 1012, stop the background tasks (listener, sweep), close Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from redis.asyncio.client import PubSub

from magi_gateway._tasks import cancel_and_wait
from magi_gateway.core import protocol
from magi_gateway.core.admin import AdminCommand, AdminError, CommandChecker
from magi_gateway.core.errors import (
    CLOSE_ADMIN_DISCONNECT,
    CLOSE_SERVICE_RESTART,
    BackendUnavailable,
    GatewayError,
    RateLimited,
    SessionNotFound,
    error_frame,
    internal_error_frame,
)
from magi_gateway.core.ids import AgentId, AppId, ConnectionId, InstanceId, SessionId
from magi_gateway.core.ratelimit import TokenBucket
from magi_gateway.core.session import ResultCode, new_session_id
from magi_gateway.logs import session_id_var
from magi_gateway.redis.client import Backoff, RedisClient, connect, open_pubsub, redis_errors
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import SessionInfo, Store, now_ms
from magi_gateway.server import metrics
from magi_gateway.server.delivery import Delivery
from magi_gateway.server.outbox import Connection
from magi_gateway.settings import Settings

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

_LOOPBACK = b""  # session id part of a readiness probe notification
_SWEEP_INTERVAL_S = 0.2
_STOP_TIMEOUT_S = 5.0
_CREATION_WAIT_POLLS = 20
_CREATION_WAIT_POLL_S = 0.05
#: How long a ``/metrics`` scrape waits for Redis before showing the last known values.
_METRICS_TIMEOUT_S = 1.0
#: Sessions one instance lists in its answer to ``admin sessions``.
_ADMIN_MAX_SESSIONS = 1000


class Gateway:
    """One gateway instance."""

    def __init__(self, settings: Settings, *, redis: RedisClient | None = None) -> None:
        self.settings = settings
        self.instance_id = InstanceId(secrets.token_hex(8))
        self.keys = Keys(settings.redis_key_prefix)
        self.redis = redis if redis is not None else connect(settings)
        self._notifications = connect(settings, client_name="magi-gateway-notify", retries=0)
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
        self.delivery = Delivery(self.store, self._spawn, self._backoff)
        self._connections: dict[ConnectionId, Connection] = {}
        self._per_app: dict[AppId, int] = {}
        self._all_closed = asyncio.Event()  # set when the last connection goes away
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._probes: dict[bytes, asyncio.Future[None]] = {}
        self._admin = CommandChecker(settings.admin_secret, self.keys.admin_channel)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for notifications and accepting connections."""
        self._listener = asyncio.create_task(self._listen(), name="magi-notifications")
        self._spawn(self._sweep_deadlines(), "magi-deadlines")
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)
        except TimeoutError:
            logger.warning("Redis not reachable at startup; will keep retrying")
        self.accepting = True
        logger.info("gateway instance %s started", self.instance_id)

    async def close_connections(self, timeout_s: float = 2.0) -> None:
        """Stop accepting; send each client what is queued, then close it with 1012.

        Called on SIGTERM before the server stops, so clients learn they should
        reconnect (to another instance) and resume.
        """
        self.accepting = False
        for connection in list(self._connections.values()):
            connection.request_close(CLOSE_SERVICE_RESTART, "Service restart", flush=True)
        if self._connections:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout_s)

    async def stop(self) -> None:
        """Stop accepting, tell clients to reconnect elsewhere, drain, close Redis."""
        self.accepting = False
        for connection in list(self._connections.values()):
            connection.request_close(CLOSE_SERVICE_RESTART, "Service restart")
        await cancel_and_wait([*self._tasks, *([self._listener] if self._listener else [])], _STOP_TIMEOUT_S)
        await self._notifications.aclose()
        await self.redis.aclose()
        logger.info("gateway instance %s stopped", self.instance_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _backoff(self) -> Backoff:
        return Backoff.for_settings(self.settings)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("task %s failed", task.get_name(), exc_info=exc)

    # -- connections -------------------------------------------------------------

    def at_capacity(self, appid: AppId) -> bool:
        """Whether ``appid`` has ``max_connections_per_app`` connections here already."""
        return self._per_app.get(appid, 0) >= self.settings.max_connections_per_app

    def connect(self, appid: AppId, peer: str = "") -> Connection:
        """Register a new authenticated connection and greet it."""
        connection = Connection(
            ConnectionId(secrets.token_hex(8)),
            appid,
            max_messages=self.settings.max_outbound_messages,
            peer=peer,
            rate_limit=TokenBucket(
                self.settings.max_messages_per_s, self.settings.message_burst, time.monotonic()
            ),
        )
        self._per_app[appid] = self._per_app.get(appid, 0) + 1
        self._connections[connection.id] = connection
        connection.push(protocol.encode({"type": "connection_established", "connection_id": connection.id}))
        metrics.CONNECTIONS.inc()
        return connection

    def disconnect(self, connection: Connection) -> None:
        """Forget a closed connection; its sessions run on (disconnect is not cancel)."""
        if self._connections.pop(connection.id, None) is not None:
            remaining = self._per_app.get(connection.appid, 1) - 1
            if remaining > 0:
                self._per_app[connection.appid] = remaining
            else:
                self._per_app.pop(connection.appid, None)
        if not self._connections:
            self._all_closed.set()
        self.delivery.forget_connection(connection)
        metrics.CONNECTIONS.dec()

    def submit_frame(self, connection: Connection, frame: str | bytes) -> asyncio.Task[Any]:
        """Handle a frame in a tracked task: a disconnect must not cut a judgement's setup short."""
        return self._spawn(self.handle_frame(connection, frame), f"frame-{connection.id}")

    async def handle_frame(self, connection: Connection, frame: str | bytes) -> None:
        """Act on one client frame; every failure becomes an error frame, never a raise."""
        metrics.BYTES_IN.inc(len(frame.encode()) if isinstance(frame, str) else len(frame))
        kind = "invalid"
        try:
            if connection.rate_limit is not None and not connection.rate_limit.allow(time.monotonic()):
                kind = "rate_limited"
                raise RateLimited("Too many messages; slow down")
            message = protocol.parse_client_frame(frame, self.limits)
            kind = message.type
            session_id_var.set(getattr(message, "session_id", None))  # this frame's task only
            await self._dispatch(connection, message)
        except GatewayError as exc:
            metrics.CLIENT_ERRORS.labels(exc.code).inc()
            connection.push(protocol.encode(error_frame(exc)))
        except Exception:
            logger.exception("unexpected error handling a frame on %s", connection.id)
            metrics.CLIENT_ERRORS.labels("internal_error").inc()
            connection.push(protocol.encode(internal_error_frame()))
        finally:
            metrics.MESSAGES_IN.labels(kind).inc()

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
        else:
            try:
                if isinstance(message, protocol.Resume):
                    await self._resume(connection, message)
                else:
                    await self.cancel(connection, message.session_id)
            except GatewayError as exc:
                # Say which session failed, so a client can retry that resume or cancel.
                if exc.session_id is None:
                    exc.session_id = message.session_id
                raise

    async def _resume(self, connection: Connection, message: protocol.Resume) -> None:
        try:
            await self.attach(connection, message.session_id, message.last_seq)
        except SessionNotFound:
            metrics.RESUMES.labels("not_found").inc()
            raise
        except BaseException:
            metrics.RESUMES.labels("error").inc()
            raise
        metrics.RESUMES.labels("ok").inc()

    # -- sessions ----------------------------------------------------------------

    async def open_judgement(self, connection: Connection, request: protocol.JudgementRequest) -> None:
        """Start a session: log it, answer missing agents at once, queue the others."""
        session_id = new_session_id()
        session_id_var.set(session_id)
        appid = connection.appid
        timeout_ms = int(self.settings.judgement_timeout_s * 1000)
        if request.request_id is not None:
            existing = await self.store.claim_request_id(
                appid, request.request_id, session_id, timeout_ms + self.settings.session_retention_s * 1000
            )
            if existing is not None:
                # A retried request: the same session again, replayed from the start
                # (unless it has expired meanwhile: then the request starts afresh).
                try:
                    await self.attach(connection, existing, 0, wait_for_creation=True)
                    return
                except SessionNotFound:
                    await self.store.rebind_request_id(appid, request.request_id, session_id, existing)
        deadline_ms = now_ms() + timeout_ms
        session = self.delivery.track(session_id, connection, 0, started=time.monotonic())
        try:
            live = await self.store.live_worker_counts(request.agent_ids)
            await self.store.create_session(
                session_id, appid, self.instance_id, request.agent_ids, deadline_ms, request.request_id
            )
        except BackendUnavailable:
            self.delivery.untrack(session)
            if request.request_id is not None:
                with contextlib.suppress(BackendUnavailable):
                    await self.store.release_request_id(appid, request.request_id, session_id)
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

    async def _session_info(
        self, connection: Connection, session_id: SessionId, *, wait: bool
    ) -> SessionInfo:
        """The session, if it exists and belongs to the connection's appid."""
        info = await self.store.session_info(session_id)
        # A duplicate request_id can arrive while the first request is still creating
        # its session: give that creation a moment before calling the session unknown.
        for _ in range(_CREATION_WAIT_POLLS if wait else 0):
            if info is not None:
                break
            await asyncio.sleep(_CREATION_WAIT_POLL_S)
            info = await self.store.session_info(session_id)
        if info is None or info.appid != connection.appid:
            raise SessionNotFound("Session not found or expired", session_id=session_id)
        return info

    async def attach(
        self, connection: Connection, session_id: SessionId, last_seq: int, *, wait_for_creation: bool = False
    ) -> None:
        """Deliver a session to ``connection``: replay after ``last_seq``, then live."""
        info = await self._session_info(connection, session_id, wait=wait_for_creation)
        if info.owner != self.instance_id and not info.completed:
            await self.store.set_owner(session_id, self.instance_id)
        # The replay runs as a task, paced by the connection's buffer, and hands over to
        # live delivery once it has caught up with the log.
        self.delivery.replay(self.delivery.track(session_id, connection, last_seq))

    async def cancel(self, connection: Connection, session_id: SessionId) -> None:
        """Give every pending agent a cancelled final and tell the workers to stop."""
        info = await self._session_info(connection, session_id, wait=False)
        if info.completed:
            raise GatewayError("Session already complete", code="session_completed", session_id=session_id)
        await self.store.finish_pending(info, ResultCode.CANCELLED, {"error": "Cancelled by the client"})
        await self.store.announce_cancel(session_id)

    async def _sweep_deadlines(self) -> None:
        """Give agents still pending at their session's deadline a timeout final."""
        backoff = self._backoff()
        error = f"Agent did not answer within {self.settings.judgement_timeout_s:g}s"
        while True:
            try:
                for session_id in await self.store.due_sessions(now_ms()):
                    info = await self.store.session_info(session_id)
                    if info is not None and not info.completed:
                        await self.store.finish_pending(info, ResultCode.TIMEOUT, {"error": error})
                    # Removed only once handled: an instance dying mid-sweep leaves it to others.
                    await self.store.clear_deadline(session_id)
                backoff.reset()
                await asyncio.sleep(_SWEEP_INTERVAL_S)
            except BackendUnavailable:
                await asyncio.sleep(backoff.next_delay())

    # -- notifications -----------------------------------------------------------

    async def _listen(self) -> None:
        """Receive this instance's notifications, reconnecting with backoff."""
        backoff = self._backoff()
        channel = self.keys.gateway_channel(self.instance_id)
        admin_channel = self.keys.admin_channel
        admin_channel_bytes = admin_channel.encode()
        while True:
            pubsub: PubSub | None = None
            try:
                with redis_errors():
                    pubsub = await open_pubsub(self._notifications)
                    # Without ADMIN_SECRET every command would be refused: not even listened to.
                    await pubsub.subscribe(channel, *([admin_channel] if self.settings.admin_secret else []))
                if backoff.failures:
                    metrics.REDIS_RECONNECTS.inc()
                    logger.info("notification subscription restored")
                    self.delivery.replay_all()
                backoff.reset()
                self._subscribed.set()
                with redis_errors():
                    # A blocking read: cancellation of a read with a timeout can be lost
                    # when both happen at once (asyncio.timeout in 3.11), hanging shutdown.
                    async for message in pubsub.listen():
                        try:
                            if message["channel"] == admin_channel_bytes:
                                self._on_admin(message["data"])
                            else:
                                self._on_notification(message["data"])
                        except Exception:
                            # A malformed message must not end the listener of every session.
                            logger.exception("could not handle a message on %r", message["channel"])
            except BackendUnavailable as exc:
                self._subscribed.clear()
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    logger.warning("notification subscription lost (%s); retrying", exc.__cause__)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_notification(self, data: bytes) -> None:
        session_part, seq_part, frame = data.split(b"\n", 2)
        if session_part == _LOOPBACK:
            probe = self._probes.pop(frame, None)
            if probe is not None and not probe.done():
                probe.set_result(None)
            return
        self.delivery.deliver(SessionId(session_part.decode()), int(seq_part), frame)

    # -- admin commands (see admin.py) ----------------------------------------------

    def _on_admin(self, data: bytes) -> None:
        try:
            command = self._admin.check(data, now_ms())
        except AdminError as exc:
            logger.warning("admin command refused: %s", exc)
            return
        logger.info("admin command %s %s", command.command, command.args)
        self._spawn(self._run_admin(command), f"admin-{command.command}")

    async def _run_admin(self, command: AdminCommand) -> None:
        appid = command.args.get("appid")
        targets = [c for c in self._connections.values() if appid is None or c.appid == appid]
        reply: dict[str, Any] = {"instance": self.instance_id, "command": command.command}
        if command.command == "broadcast":
            frame = protocol.encode({"type": "broadcast", "message": command.args["message"]})
            reply["connections"] = sum(c.push(frame) for c in targets)
        elif command.command in ("disconnect-all", "disconnect-app"):
            for connection in targets:
                connection.request_close(CLOSE_ADMIN_DISCONNECT, "Disconnected by admin", flush=True)
            reply["connections"] = len(targets)
        else:  # sessions
            reply["connections"] = len(self._connections)
            reply["sessions"] = [
                {
                    "session_id": s.id,
                    "appid": s.connection.appid,
                    "connection_id": s.connection.id,
                    "last_seq": s.cursor.last_seq,
                }
                for s in list(self.delivery.sessions.values())[:_ADMIN_MAX_SESSIONS]
            ]
        try:
            with redis_errors():
                await self.redis.publish(command.reply_to, orjson.dumps(reply))
        except BackendUnavailable:
            logger.warning("could not answer admin command %s", command.command)

    # -- readiness and metrics -----------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Set the gauges that describe Redis (all instances), for a ``/metrics`` scrape."""
        try:
            async with asyncio.timeout(_METRICS_TIMEOUT_S):  # a scrape must not hang on Redis
                running = await self.store.running_sessions()
                stats = await self.store.agent_stats()
        except (BackendUnavailable, TimeoutError):
            metrics.REDIS_ERRORS.inc()
            return  # the scrape shows the last known values; /readyz says why
        metrics.SESSIONS.labels("running").set(running)
        for gauge in (metrics.AGENT_QUEUE_LAG, metrics.AGENT_PENDING, metrics.AGENT_WORKERS):
            gauge.clear()
        for agent_id, stat in stats.items():
            metrics.AGENT_QUEUE_LAG.labels(agent_id).set(stat.lag)
            metrics.AGENT_PENDING.labels(agent_id).set(stat.pending)
            metrics.AGENT_WORKERS.labels(agent_id).set(stat.workers)

    async def live_agents(self) -> dict[AgentId, int]:
        """Agents with live workers (for ``get_agents`` and the console)."""
        return await self.store.live_agents()

    async def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether a Redis write and a notification loopback both work now (within ``timeout_s``).

        The write matters behind Sentinel: a master refusing writes (``min-replicas-to-write``
        during a failover) still delivers publishes.
        """
        if not self.accepting or not self._subscribed.is_set():
            return False
        token = secrets.token_hex(8).encode()
        probe: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[token] = probe
        try:
            async with asyncio.timeout(timeout_s):
                with redis_errors():
                    await self.redis.set(self.keys.ready_probe(self.instance_id), token, px=5000)
                    await self.redis.publish(self.keys.gateway_channel(self.instance_id), b"\n0\n" + token)
                await probe
            return True
        except (BackendUnavailable, TimeoutError):
            return False
        finally:
            self._probes.pop(token, None)
