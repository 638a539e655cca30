"""The ``/ws`` endpoint: a thin driver moving frames between a WebSocket and the gateway."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from magi_gateway.core import frames
from magi_gateway.core.auth import FailureThrottle, TokenVerifier
from magi_gateway.core.errors import CLOSE_AUTH_FAILED, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER
from magi_gateway.core.ids import AppId
from magi_gateway.logs import connection_id_var
from magi_gateway.server import metrics
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.outbox import Connection

__all__ = ["WebSocketEndpoint"]

logger = logging.getLogger(__name__)

#: Close code for a browser whose Origin is not in CORS_ORIGINS (sent before accept: HTTP 403).
CLOSE_ORIGIN_REJECTED = 4003


class WebSocketEndpoint:
    """ASGI-level handler of one WebSocket connection."""

    def __init__(self, gateway: Gateway, verifier: TokenVerifier, throttle: FailureThrottle) -> None:
        self.gateway = gateway
        self.verifier = verifier
        self.throttle = throttle
        origins = gateway.settings.cors_origin_list
        self.allowed_origins: frozenset[str] | None = None if "*" in origins else frozenset(origins)

    async def handle(self, websocket: WebSocket) -> None:
        """Authenticate, then pump frames both ways until either side closes."""
        origin = websocket.headers.get("origin")
        if self.allowed_origins is not None and origin and origin not in self.allowed_origins:
            await websocket.close(code=CLOSE_ORIGIN_REJECTED)
            return
        peer = websocket.client.host if websocket.client else ""
        appid = websocket.query_params.get("appid", "")
        token = websocket.query_params.get("token", "")
        now = time.time()
        await websocket.accept()
        if self.throttle.is_blocked(peer, now, appid):
            await self._reject(websocket, frames.AUTH_THROTTLED, "throttled")
            return
        if not self.verifier.verify(appid, token, now):
            self.throttle.record_failure(peer, now, appid)
            await self._reject(websocket, frames.AUTH_FAILED, "bad_token")
            return
        if not self.gateway.accepting:
            await websocket.close(code=CLOSE_SERVICE_RESTART, reason="Service restart")
            return
        if self.gateway.at_capacity(AppId(appid)):
            await websocket.send_text(frames.TOO_MANY_CONNECTIONS.decode())
            await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason="Too many connections")
            return
        connection = self.gateway.connect(AppId(appid), peer)
        connection_id_var.set(connection.id)  # for the logs of this task and those it starts

        async def send_text(text: str) -> None:
            await websocket.send_text(text)

        async def close(code: int, reason: str) -> None:
            await websocket.close(code=code, reason=reason)

        sender = asyncio.create_task(connection.run_sender(send_text, close))
        receiver = asyncio.create_task(self._receive(websocket, connection))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            self.gateway.disconnect(connection)

    async def _receive(self, websocket: WebSocket, connection: Connection) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            # Shielded: when the connection goes away mid-frame the receiver is cancelled,
            # but the frame's work (e.g. queueing a judgement's requests) completes.
            await asyncio.shield(self.gateway.submit_frame(connection, frame))

    async def _reject(self, websocket: WebSocket, frame: bytes, reason: str) -> None:
        metrics.AUTH_FAILURES.labels(reason).inc()
        try:
            await websocket.send_text(frame.decode())
            await websocket.close(code=CLOSE_AUTH_FAILED, reason="Authentication failed")
        except (WebSocketDisconnect, RuntimeError, OSError):
            logger.debug("client left before the auth failure was sent")
