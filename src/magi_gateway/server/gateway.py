"""One gateway instance: its connections, its background tasks, and its shutdown.

It is driven by the WebSocket drivers (``connect``, ``receive``, ``disconnect``)
and by Redis (the ``Listener`` on this instance's channel). It holds no state another
instance cannot rebuild from Redis: a session's log, pending agents, viewers and
deadline live there; this object keeps only the delivery state of the sessions its
connections watch. The parts, one module each::

    Listener      notifications in (server.listener)  ──> Delivery (server.delivery)
    SessionOps    judgement / resume / cancel (server.sessions)
    sweep         the shared deadline set (server.sweeper)
    renewal       the leases of this instance's viewers (server.viewers)
    AdminExecutor signed admin commands (server.admin)

Shutdown, top to bottom (``stop``): stop accepting connections, close every client
with 1012, remove this instance's viewers from Redis, stop the background tasks
(listener, sweep, lease renewal, replays), close Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from magi_gateway._tasks import cancel_and_wait
from magi_gateway._util import Backoff
from magi_gateway.core import dialect, frames, protocol
from magi_gateway.core.admin import CommandChecker
from magi_gateway.core.connection import ClientProtocol, Received
from magi_gateway.core.errors import (
    CLOSE_SERVICE_RESTART,
    BackendCommandError,
    BackendUnavailable,
    GatewayError,
)
from magi_gateway.core.ids import AppId, ConnectionId, InstanceId
from magi_gateway.core.jwt_auth import JwtVerifier
from magi_gateway.core.ratelimit import TokenBucket
from magi_gateway.logs import connection_id_var, session_id_var
from magi_gateway.redis.client import connect
from magi_gateway.redis.intake import AppLimits
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.server import metrics
from magi_gateway.server.admin import AdminExecutor
from magi_gateway.server.delivery import Delivery
from magi_gateway.server.listener import Listener
from magi_gateway.server.outbox import Connection
from magi_gateway.server.sessions import SessionOps
from magi_gateway.server.sweeper import sweep_deadlines
from magi_gateway.server.viewers import renew_viewers
from magi_gateway.settings import Settings

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0
#: How long a ``/metrics`` scrape waits for Redis before showing the last known values.
_METRICS_TIMEOUT_S = 1.0
_STARTUP_SUBSCRIBE_S = 5.0
#: How long a stopping instance tries to remove its viewers from Redis (else their leases end).
_LEAVE_TIMEOUT_S = 1.0


class Gateway:
    """One gateway instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = InstanceId(secrets.token_hex(8))
        self.keys = Keys(settings.redis_key_prefix)
        self.redis = connect(settings)
        self.store = Store(
            self.redis,
            self.keys,
            retention_s=settings.session_retention_s,
            max_session_messages=settings.max_session_messages,
            request_stream_maxlen=settings.request_stream_maxlen,
            app_limits=AppLimits(settings.max_sessions_per_app, settings.max_sessions_per_s_per_app),
        )
        self.limits = protocol.Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_agents=settings.max_agents_per_request,
            max_input_bytes=settings.max_input_bytes,
        )
        self.accepting = False
        self.delivery = Delivery(
            self.store,
            self._spawn,
            self._backoff,
            self.instance_id,
            lambda connection: self._connections.get(connection.id) is connection,
        )
        self.sessions = SessionOps(settings, self.store, self.delivery, self.instance_id)
        self.admin = AdminExecutor(
            CommandChecker(settings.admin_secret, self.keys.admin_channel),
            self.instance_id,
            self.store,
            self.delivery,
            lambda: self._connections.values(),
            self._spawn,
        )
        # Without ADMIN_SECRET every command would be refused: not even listened to.
        self.listener = Listener(
            connect(settings, client_name="magi-gateway-notify", retries=0),
            self.keys.gateway_channel(self.instance_id),
            self.delivery,
            self._backoff,
            admin_channel=self.keys.admin_channel if settings.admin_secret else None,
            on_admin=self.admin.on_message,
        )
        self._connections: dict[ConnectionId, Connection] = {}
        self._per_app: dict[AppId, int] = {}
        self._all_closed = asyncio.Event()  # set when the last connection goes away
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for notifications and sweeping deadlines, then accept connections."""
        self._spawn(self.listener.run(), "magi-notifications")
        self._spawn(
            sweep_deadlines(self.store, self.settings.judgement_timeout_s, self._backoff), "magi-deadlines"
        )
        self._spawn(renew_viewers(self.delivery, self.settings.viewer_lease_s, self._backoff), "magi-viewers")
        try:
            await asyncio.wait_for(self.listener.subscribed.wait(), timeout=_STARTUP_SUBSCRIBE_S)
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
        """Stop accepting, tell clients to reconnect elsewhere, stop the tasks, close Redis."""
        self.accepting = False
        for connection in list(self._connections.values()):
            connection.request_close(CLOSE_SERVICE_RESTART, "Service restart")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.delivery.leave_all(), _LEAVE_TIMEOUT_S)
        await cancel_and_wait(self._tasks, _STOP_TIMEOUT_S)
        await self.listener.redis.aclose()
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

    def hold_app_slot(self, appid: AppId) -> None:
        """Count one more connection (or ``/v1`` event stream) of ``appid`` here."""
        self._per_app[appid] = self._per_app.get(appid, 0) + 1

    def release_app_slot(self, appid: AppId) -> None:
        """Undo one ``hold_app_slot``."""
        remaining = self._per_app.get(appid, 1) - 1
        if remaining > 0:
            self._per_app[appid] = remaining
        else:
            self._per_app.pop(appid, None)

    def connect(
        self, appid: AppId, peer: str = "", *, expires_at: float | None = None, jwt: JwtVerifier | None = None
    ) -> Connection:
        """Register a new authenticated connection and greet it (``expires_at``: its JWT's
        ``exp``; ``jwt``: checks the tokens of its ``refresh`` messages)."""
        connection = Connection(
            ConnectionId(secrets.token_hex(8)),
            appid,
            max_messages=self.settings.max_outbound_messages,
            limits=self.limits,
            max_bytes=self.settings.max_outbound_bytes,
            peer=peer,
            rate_limit=TokenBucket(
                self.settings.max_messages_per_s, self.settings.message_burst, time.monotonic()
            ),
            expires_at=expires_at,
            jwt=jwt,
        )
        self.hold_app_slot(appid)
        self._connections[connection.id] = connection
        connection.push(frames.connection_established(connection.id), b"connection_established")
        metrics.CONNECTIONS.inc()
        return connection

    def disconnect(self, connection: Connection) -> None:
        """Forget a closed connection; its sessions run on (disconnect is not cancel)."""
        connection.stop_expiry()
        if self._connections.pop(connection.id, None) is not None:
            self.release_app_slot(connection.appid)
        if not self._connections:
            self._all_closed.set()
        self.delivery.forget_connection(connection)
        metrics.CONNECTIONS.dec()

    # -- client frames -----------------------------------------------------------

    def receive(self, connection: Connection, frame: str | bytes) -> asyncio.Task[None] | None:
        """Act on one client frame (never raises; every failure becomes an error frame).

        Frames are answered in the order they came. What needs no I/O (a pong, an error)
        is answered at once unless commands are queued before it; a command joins the
        connection's queue, run one at a time by a tracked task (a disconnect does not
        cut a judgement's setup short). Returns that task when this frame started it.
        """
        metrics.BYTES_IN.inc(len(frame.encode()) if isinstance(frame, str) else len(frame))
        received = connection.client.receive(frame, time.monotonic(), time.time())
        if received.ack is not None:  # "received" (original dialect): at once, before any answer
            connection.push(received.ack, b"message_received")
        commands = connection.commands
        if received.command is None and not commands:
            self._answer(connection, received)
            return None
        commands.append(received)
        if len(commands) > 1:
            return None  # the running task takes it in turn
        task = self._spawn(self._run_commands(connection), f"commands-{connection.id}")
        connection.commands_task = task
        return task

    def _answer(self, connection: Connection, received: Received) -> None:
        metrics.MESSAGES_IN.labels(received.kind).inc()
        if received.error is not None:
            metrics.CLIENT_ERRORS.labels(received.error).inc()
        if received.reply is not None:
            connection.push(received.reply, received.reply_kind)

    async def _run_commands(self, connection: Connection) -> None:
        connection_id_var.set(connection.id)  # this task's logs
        commands = connection.commands
        while commands:
            received = commands[0]
            if (command := received.command) is not None:
                session_id_var.set(getattr(command, "session_id", None))
                try:
                    await self._dispatch(connection, command)
                except GatewayError as exc:
                    if isinstance(exc, BackendCommandError):
                        logger.error("Redis refused a command for %s: %s", connection.id, exc.__cause__)
                    received = ClientProtocol.failed(command, exc)
                except Exception:
                    logger.exception("unexpected error handling a frame on %s", connection.id)
                    received = ClientProtocol.crashed(command)
            self._answer(connection, received)
            commands.popleft()
        connection.commands_task = None

    async def _dispatch(self, connection: Connection, command: protocol.ClientMessage) -> None:
        if isinstance(command, protocol.GetAgents):
            agents = await self.store.liveness.live_agents()
            connection.push(frames.agents_frame(agents, command.request_id), b"agents")
        elif isinstance(command, protocol.GetVoters):
            agents = await self.store.liveness.live_agents()
            aliases = {**self.sessions.aliases, **await self.store.liveness.declared_aliases()}
            voters = dialect.voters_frame(agents, aliases, command.request_id)
            connection.push(voters, b"get_voters_response")
        elif isinstance(command, protocol.JudgementRequest):
            await self.open_judgement(connection, command)
        elif isinstance(command, protocol.Resume):
            await self.sessions.resume(connection, command)
        elif isinstance(command, protocol.Cancel):
            await self.sessions.cancel(connection, command.session_id)

    async def open_judgement(self, connection: Connection, request: protocol.JudgementRequest) -> None:
        """Start a session for ``request`` (see ``SessionOps.open_judgement``)."""
        await self.sessions.open_judgement(connection, request)

    # -- readiness and metrics -----------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Set the gauges that describe Redis (all instances), for a ``/metrics`` scrape."""
        metrics.publish_counts()
        try:
            async with asyncio.timeout(_METRICS_TIMEOUT_S):  # a scrape must not hang on Redis
                running = await self.store.deadlines.running()
                stats = await self.store.liveness.agent_stats()
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

    async def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether a Redis write and a notification loopback both work now (within ``timeout_s``).

        The write matters behind Sentinel: a master refusing writes (``min-replicas-to-write``
        during a failover) still delivers publishes.
        """
        if not self.accepting or not self.listener.subscribed.is_set():
            return False
        token = secrets.token_hex(8).encode()
        probe = self.listener.expect_probe(token)
        try:
            async with asyncio.timeout(timeout_s):
                await self.store.signals.probe(self.instance_id, token)
                await probe
            return True
        except (BackendUnavailable, TimeoutError):
            return False
        finally:
            self.listener.forget_probe(token)
