"""The ``/ws`` endpoint under any ASGI server: a thin driver around the core.

The handshake's checks are the core's (``core.handshake``), the handling of client
frames too (``Gateway.receive`` → ``core.connection``); this driver moves frames
between Starlette's WebSocket and the connection's outbox, with a sender task and a
receiver task per connection. ``magi-gateway serve`` uses the faster driver in
``server.ws_protocol`` instead; this one serves ``uvicorn magi_gateway.main:app``-style
deployments and any other ASGI server.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from magi_gateway.core.handshake import Admission, Refusal
from magi_gateway.logs import connection_id_var
from magi_gateway.server import metrics
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.outbox import Connection

__all__ = ["WebSocketEndpoint"]

logger = logging.getLogger(__name__)


class WebSocketEndpoint:
    """ASGI-level handler of one WebSocket connection."""

    def __init__(self, gateway: Gateway, admission: Admission) -> None:
        self.gateway = gateway
        self.admission = admission

    async def handle(self, websocket: WebSocket) -> None:
        """Authenticate, then pump frames both ways until either side closes."""
        refusal = self.admission.check_origin(websocket.headers.get("origin"))
        if refusal is not None:
            await websocket.close(code=refusal.code)
            return
        peer = websocket.client.host if websocket.client else ""
        admitted = self.admission.admit(
            peer,
            websocket.query_params.get("appid", ""),
            websocket.query_params.get("token", ""),
            time.time(),
            accepting=self.gateway.accepting,
            at_capacity=self.gateway.at_capacity,
        )
        await websocket.accept()
        if isinstance(admitted, Refusal):
            await self._refuse(websocket, admitted)
            return
        connection = self.gateway.connect(
            admitted.appid, peer, expires_at=admitted.expires_at, jwt=self.admission.jwt
        )
        connection_id_var.set(connection.id)  # for the logs of this task and those it starts

        async def send_text(text: str) -> None:
            await websocket.send_text(text)

        async def close(code: int, reason: str) -> None:
            await websocket.close(code=code, reason=reason)

        sender = asyncio.create_task(connection.run_sender(send_text, close))
        receiver = asyncio.create_task(self._receive(websocket, connection))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sender, receiver):
                task.cancel()
            # asyncio.wait, not gather: cancelled while waiting (Starlette's TestClient
            # cancels the handler once its client closed), this handler leaves in the
            # same loop iteration; waiting one more, the server's cancel would land twice.
            await asyncio.wait({sender, receiver})
        finally:
            for task in (sender, receiver):
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the connection is over either way
            self.gateway.disconnect(connection)

    async def _receive(self, websocket: WebSocket, connection: Connection) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            commands = self.gateway.receive(connection, frame)
            if commands is not None:
                # One frame at a time, as the client sent them. Shielded: when the
                # connection goes away mid-frame the receiver is cancelled, but the
                # frame's work (e.g. queueing a judgement's requests) completes.
                await asyncio.shield(commands)

    @staticmethod
    async def _refuse(websocket: WebSocket, refusal: Refusal) -> None:
        if refusal.auth_failure is not None:
            metrics.AUTH_FAILURES.labels(refusal.auth_failure).inc()
        try:
            if refusal.frame is not None:
                await websocket.send_text(refusal.frame.decode())
            await websocket.close(code=refusal.code, reason=refusal.reason)
        except (WebSocketDisconnect, RuntimeError, OSError):
            logger.debug("client left before the refusal was sent")
