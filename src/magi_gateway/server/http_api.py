"""The ``/v1`` HTTP API: judgements, session event streams (SSE), snapshots, cancels, agents.

The same sessions as the WebSocket, through the same code: a judgement's body is parsed
by ``core.protocol`` with the WebSocket's limits and error codes and opened by
``SessionOps.start_judgement`` (idempotency, quotas, intake); cancels are
``SessionOps.cancel_session``; streams read the session's log (``server.sse``).

Every route but the debug ``/v1/token`` authenticates with the
WebSocket handshake's checks (``core.handshake.Admission``: the same per-address auth
throttle, seed tokens and JWTs), credentials taken by ``core.sse.credentials``. Each
request then counts as one message of its (address, appid) against ``MAX_MESSAGES_PER_S``
/ ``MESSAGE_BURST``, as a WebSocket client's messages do (buckets kept for the most recent
``_MAX_CLIENTS`` pairs; overflow: evict the oldest). An event stream counts as one
connection of its appid (``MAX_CONNECTIONS_PER_APP``) and takes one of the instance's
``SSE_MAX_STREAMS`` slots (over it: 503 ``too_many_streams``); a stream of a running
session is one of its viewers (``server.stream_viewer``: over ``MAX_VIEWERS_PER_SESSION``,
429 ``too_many_viewers`` before any event). Errors are the WebSocket's error JSON with the
status ``core.errors.http_status`` gives its code.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from magi_gateway._util import Backoff
from magi_gateway.core import frames, protocol, sse
from magi_gateway.core.errors import (
    BackendCommandError,
    BackendUnavailable,
    FrameTooLarge,
    GatewayError,
    RateLimited,
    SessionNotFound,
    http_status,
)
from magi_gateway.core.handshake import Admission, Admitted, Refusal
from magi_gateway.core.ids import AppId, SessionId, is_session_id
from magi_gateway.core.ratelimit import TokenBucket
from magi_gateway.redis.client import connect
from magi_gateway.redis.follow import SessionFollower
from magi_gateway.server import metrics
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.openapi import OPENAPI
from magi_gateway.server.sse import HEADERS, EventStream, StreamSlots
from magi_gateway.server.stream_viewer import StreamViewer

__all__ = ["HttpApi"]

logger = logging.getLogger(__name__)

_MAX_CLIENTS = 10_000
_RESTARTING = frames.encode({"error": "Service restart; try another instance", "code": "service_restart"})
_TOO_MANY_STREAMS = frames.encode(
    {"error": "Too many event streams on this instance; try again later", "code": "too_many_streams"}
)
_JSON = "application/json"


def _error(body: bytes, *, headers: dict[str, str] | None = None) -> Response:
    code = orjson.loads(body)["code"]
    status = http_status(code)
    extra = dict(headers or {})
    if status in (429, 503):
        extra.setdefault("Retry-After", "1")
    return Response(body, status, headers=extra, media_type=_JSON)


def _failure(exc: GatewayError) -> Response:
    metrics.CLIENT_ERRORS.labels(exc.code).inc()
    return _error(frames.error_frame(exc))


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status, media_type=_JSON)


class HttpApi:
    """The ``/v1`` routes of one gateway instance."""

    def __init__(self, gateway: Gateway, admission: Admission) -> None:
        self.gateway = gateway
        self.admission = admission
        settings = gateway.settings
        self.settings = settings
        #: A client of its own: streams block on their reads (``redis.follow``).
        self.follower = SessionFollower(
            connect(settings, client_name="magi-gateway-sse", max_connections=settings.sse_max_streams),
            gateway.keys,
        )
        #: Snapshots on the shared pool: a stream's blocked read must not hold one up.
        self.reader = SessionFollower(gateway.redis, gateway.keys)
        self.slots = StreamSlots(settings.sse_max_streams)
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def routes(self) -> list[Route]:
        """The routes, for the application."""
        return [
            Route("/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/v1/judgements", self._guarded(self.post_judgement), methods=["POST"]),
            Route("/v1/agents", self._guarded(self.agents), methods=["GET"]),
            Route("/v1/sessions/{session_id}", self._guarded(self.snapshot), methods=["GET"]),
            Route("/v1/sessions/{session_id}/events", self._guarded(self.events), methods=["GET"]),
            Route("/v1/sessions/{session_id}/cancel", self._guarded(self.cancel), methods=["POST"]),
        ]

    async def aclose(self) -> None:
        """Close the streams' Redis client."""
        await self.follower.aclose()

    # -- admission -------------------------------------------------------------------

    @staticmethod
    def _guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except GatewayError as exc:
                return _failure(exc)
            except Exception:
                logger.exception("unexpected error answering %s %s", request.method, request.url.path)
                return _error(frames.internal_error_frame())

        return guarded

    def _admit(self, request: Request, *, stream: bool = False) -> Admitted | Response:
        """Who the request is from, or the answer refusing it."""
        appid, token = sse.credentials(request.headers, request.query_params)
        peer = request.client.host if request.client else ""
        now = time.time()
        admitted = self.admission.admit(
            peer,
            appid,
            token,
            now,
            accepting=self.gateway.accepting,
            at_capacity=self.gateway.at_capacity if stream else lambda _appid: False,
        )
        if isinstance(admitted, Refusal):
            if admitted.auth_failure is not None:
                metrics.AUTH_FAILURES.labels(admitted.auth_failure).inc()
            headers = {"WWW-Authenticate": "Bearer"} if admitted.auth_failure == "bad_token" else None
            return _error(admitted.frame or _RESTARTING, headers=headers)
        if not self._allow(peer, admitted.appid, time.monotonic()):
            return _failure(RateLimited("Too many requests; slow down"))
        return admitted

    def _allow(self, peer: str, appid: AppId, now: float) -> bool:
        key = (peer, appid)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.settings.max_messages_per_s, self.settings.message_burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > _MAX_CLIENTS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.allow(now)

    def _open_stream(self, admitted: Admitted) -> Callable[[], None] | Response:
        """Take a stream slot and count the stream as a connection of its appid; the
        callable gives both back."""
        if not self.slots.take():
            return _error(_TOO_MANY_STREAMS)
        self.gateway.hold_app_slot(admitted.appid)

        def close() -> None:
            self.slots.give_back()
            self.gateway.release_app_slot(admitted.appid)

        return close

    def _viewer(self, session_id: SessionId) -> StreamViewer:
        return StreamViewer(
            self.gateway.store.viewers,
            self.gateway.instance_id,
            session_id,
            max_viewers=self.settings.max_viewers_per_session,
            lease_s=self.settings.viewer_lease_s,
            backoff=lambda: Backoff.for_settings(self.settings),
        )

    def _stream(
        self, viewer: StreamViewer, after_seq: int, admitted: Admitted, close: Callable[[], None]
    ) -> EventStream:
        return EventStream(
            self.follower,
            viewer,
            after_seq,
            keepalive_s=self.settings.sse_keepalive_s,
            write_timeout_s=self.settings.sse_write_timeout_s,
            backoff=lambda: Backoff.for_settings(self.settings),
            accepting=lambda: self.gateway.accepting,
            on_close=close,
            expires_at=admitted.expires_at,
        )

    # -- routes ----------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        """``GET /v1/openapi.json``: this API, described (credentials as every ``/v1`` route)."""
        admitted = self._admit(request, stream=False)
        if isinstance(admitted, Response):
            return admitted
        return _json(orjson.dumps(OPENAPI))

    async def post_judgement(self, request: Request) -> Response:
        """``POST /v1/judgements``: open a session; SSE with ``Accept: text/event-stream``, else 202."""
        streaming = "text/event-stream" in request.headers.get("accept", "")
        admitted = self._admit(request, stream=streaming)
        if isinstance(admitted, Response):
            return admitted
        judgement = protocol.parse_judgement_body(await self._body(request), self.gateway.limits)
        close = self._open_stream(admitted) if streaming else None
        if isinstance(close, Response):
            return close
        appid = admitted.appid
        completed = False

        async def retried(existing: SessionId) -> None:
            nonlocal completed
            completed = (await self.gateway.sessions.find_session(appid, existing, wait=True)).completed

        try:
            session_id = await self.gateway.sessions.start_judgement(appid, judgement, retried=retried)
            metrics.MESSAGES_IN.labels("agent_judgement").inc()
            if close is None:
                body = {"session_id": session_id, "seq": 1, "events": f"/v1/sessions/{session_id}/events"}
                return _json(orjson.dumps(body), 202)
            viewer = self._viewer(session_id)
            if not completed:
                await self._join_opened(viewer)
        except BaseException:
            if close is not None:
                close()
            raise
        return self._stream(viewer, 0, admitted, close)

    @staticmethod
    async def _join_opened(viewer: StreamViewer) -> None:
        """Join a session just opened (or retried): its judgement is under way, so a Redis
        that cannot be reached now only delays the stream's registration to its first
        lease renewal (a retried session's stream can still be refused, 429)."""
        try:
            await viewer.join()
        except (BackendUnavailable, BackendCommandError) as exc:
            logger.warning(
                "event stream of %s: registered later (%s)", viewer.session_id, exc.__cause__ or exc
            )
            viewer.count_later()

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused past ``MAX_FRAME_BYTES`` (without reading the rest)."""
        limit = self.gateway.limits.max_frame_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FrameTooLarge(f"Body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise FrameTooLarge(f"Body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def events(self, request: Request) -> Response:
        """``GET /v1/sessions/{id}/events``: the session as SSE after ``Last-Event-ID`` / ``?last_seq``."""
        admitted = self._admit(request, stream=True)
        if isinstance(admitted, Response):
            return admitted
        session_id = _session_id(request)
        after_seq = sse.cursor(request.headers.get("last-event-id"), request.query_params.get("last_seq"))
        info = await self.gateway.sessions.find_session(admitted.appid, session_id, wait=False)
        if request.method == "HEAD":  # the headers a stream would have; no stream
            return Response(headers={k.decode(): v.decode() for k, v in HEADERS})
        close = self._open_stream(admitted)
        if isinstance(close, Response):
            return close
        viewer = self._viewer(session_id)
        try:
            if not info.completed:  # a completed session's stream only replays: not counted
                await viewer.join()
        except BaseException:
            close()
            raise
        return self._stream(viewer, after_seq, admitted, close)

    async def snapshot(self, request: Request) -> Response:
        """``GET /v1/sessions/{id}``: where the session stands."""
        admitted = self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        session_id = _session_id(request)
        snapshot = await self.reader.snapshot(session_id)
        if snapshot is None or snapshot.appid != admitted.appid:
            raise SessionNotFound("Session not found or expired", session_id=session_id)
        body = {
            "session_id": session_id,
            "agent_ids": snapshot.agent_ids,
            "pending": snapshot.pending,
            "finals": snapshot.finals,
            "completed": snapshot.completed,
            "verdict": snapshot.verdict if snapshot.completed else None,
            "last_seq": snapshot.last_seq,
        }
        return _json(orjson.dumps(body))

    async def cancel(self, request: Request) -> Response:
        """``POST /v1/sessions/{id}/cancel``: cancelled finals for its pending agents."""
        admitted = self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        session_id = _session_id(request)
        await self.gateway.sessions.cancel_session(admitted.appid, session_id)
        metrics.MESSAGES_IN.labels("cancel").inc()
        return _json(orjson.dumps({"session_id": session_id, "cancelled": True}))

    async def agents(self, request: Request) -> Response:
        """``GET /v1/agents``: the WebSocket's ``agents`` frame."""
        admitted = self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        return _json(frames.agents_frame(await self.gateway.store.liveness.live_agents()))


def _session_id(request: Request) -> SessionId:
    value = request.path_params["session_id"]
    if not is_session_id(value):
        raise SessionNotFound("Session not found or expired")
    return SessionId(value)
