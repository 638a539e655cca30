"""The fast ``/ws`` driver: an asyncio protocol plugged into uvicorn (``Config(ws=...)``).

uvicorn parses the HTTP request and, on a WebSocket upgrade, hands the socket to this
class; every other route (console, ``/healthz``, ``/readyz``, ``/metrics``,
``/v1/token``) stays on the ASGI app, on the same port. No task per connection and no
ASGI messages per frame: frames the client sends are handled in ``data_received``
(``Gateway.receive`` → ``core.connection``); frames queued for the client are written
once per loop iteration, all of them in one ``transport.write`` (``_flush``). The
framing is ``core.wsframe``; the handshake's checks are ``core.handshake``, as in the
ASGI driver (``server.websocket``), which serves ``uvicorn magi_gateway.main:app``.

Bounds: a client message is at most ``ws_max_size`` bytes (close 1009); the outbox
is the core's (close 1013); while the transport's buffer is over its high-water mark
nothing is written and the outbox fills (flow control: ``pause_writing``); while a
connection's commands are queued past ``_MAX_QUEUED_COMMANDS`` its socket is not read.

uvicorn internals used (pinned in constraints.txt): the constructor's keyword
arguments, ``server_state.connections`` and ``shutdown()``, and ``_TrustedHosts`` of its
proxy-headers middleware (the same trust rule as ``FORWARDED_ALLOW_IPS`` on HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast
from urllib.parse import parse_qs

from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.server import ServerState

from magi_gateway.core import wsframe
from magi_gateway.core.errors import CLOSE_SERVICE_RESTART
from magi_gateway.core.handshake import Admission, Refusal
from magi_gateway.server import metrics
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.outbox import Connection, skipped_bad_frame
from magi_gateway.server.plain_http import plain_response

__all__ = ["FastWebSocket", "fast_websocket_class"]

logger = logging.getLogger(__name__)

#: Commands (judgements, resumes...) queued on one connection before its socket is not read.
_MAX_QUEUED_COMMANDS = 8
#: How long to wait for the client's close frame after sending ours.
_CLOSE_TIMEOUT_S = 5.0
_WS_PATH = "/ws"


def fast_websocket_class(gateway: Gateway, admission: Admission) -> type[FastWebSocket]:
    """The protocol class for ``uvicorn.Config(ws=...)``, bound to one gateway."""
    return type("BoundFastWebSocket", (FastWebSocket,), {"gateway": gateway, "admission": admission})


class FastWebSocket(asyncio.Protocol):
    """One WebSocket connection on ``/ws``, after uvicorn's HTTP parser saw the upgrade."""

    gateway: Gateway
    admission: Admission

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any]) -> None:
        self.config = config
        self.server_state = server_state
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.connection: Connection | None = None
        self.reader = wsframe.FrameReader(config.ws_max_size)
        self._handshaken = False
        self._closing = False  # our close frame is sent (or the socket is going away)
        self._paused_writing = False
        self._paused_reading = False
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting_pong = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peername = transport.get_extra_info("peername")
        self.peer = peername[0] if isinstance(peername, tuple) else ""
        self.server_state.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.connection is not None:
            self.gateway.disconnect(self.connection)
            self.connection = None

    def data_received(self, data: bytes) -> None:
        if not self._handshaken:
            self._handshake(data)
            return
        try:
            messages = self.reader.feed(data)
        except wsframe.FrameError as exc:
            self._fail(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            self._on_message(opcode, payload)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._flush()

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client to reconnect elsewhere (1012)."""
        if self.connection is not None:
            self.connection.request_close(CLOSE_SERVICE_RESTART, "Service restart", flush=True)
        elif self.transport is not None and not self._closing:
            self.transport.close()

    # -- the opening handshake --------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        assert self.transport is not None
        self._handshaken = True
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        forwarded: list[str] = []
        for line in header_lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "x-forwarded-for":
                forwarded.append(value)
            headers[name] = value
        target = request_line.split(" ")[1] if request_line.count(" ") >= 2 else ""
        path, _, query = target.partition("?")
        if path != _WS_PATH:
            self._refuse_http(404, "Not Found")
            return
        key = headers.get("sec-websocket-key", "")
        if headers.get("sec-websocket-version") != "13" or not key:
            self._refuse_http(400, "Unsupported WebSocket version or missing key")
            return
        if self.admission.check_origin(headers.get("origin")) is not None:
            self._refuse_http(403, "Origin not allowed")
            return
        if forwarded and self.config.proxy_headers:
            trusted = _trusted_hosts(self.config.forwarded_allow_ips)
            if self.peer in trusted:
                host, _port = trusted.get_trusted_client_address(", ".join(forwarded))
                self.peer = host or self.peer
        params = parse_qs(query)
        appid = params.get("appid", [""])[0]
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %s\r\n\r\n" % wsframe.accept_key(key).encode()
        )
        admitted = self.admission.admit(
            self.peer,
            appid,
            params.get("token", [""])[0],
            time.time(),
            accepting=self.gateway.accepting,
            at_capacity=self.gateway.at_capacity,
        )
        if isinstance(admitted, Refusal):
            self._refuse(admitted)
            return
        connection = self.connection = self.gateway.connect(
            admitted.appid, self.peer, expires_at=admitted.expires_at, jwt=self.admission.jwt
        )
        connection.set_writer(self._schedule_flush)
        self._flush()  # the greeting
        self._arm_ping()
        if rest:
            self.data_received(rest)

    def _refuse_http(self, status: int, message: str) -> None:
        assert self.transport is not None
        self._closing = True
        self.transport.write(plain_response(status, message, self.server_state.default_headers))
        self.transport.close()

    def _refuse(self, refusal: Refusal) -> None:
        assert self.transport is not None
        if refusal.auth_failure is not None:
            metrics.AUTH_FAILURES.labels(refusal.auth_failure).inc()
        if refusal.frame is not None:
            self.transport.write(wsframe.text_header(len(refusal.frame)) + refusal.frame)
        self._send_close(refusal.code, refusal.reason)

    # -- client frames -------------------------------------------------------------------

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if opcode == wsframe.OP_TEXT or opcode == wsframe.OP_BINARY:
            connection = self.connection
            if connection is None or connection.closing:
                return  # refused or closing: what the client still sends is ignored
            task = self.gateway.receive(connection, payload)
            if len(connection.commands) >= _MAX_QUEUED_COMMANDS and not self._paused_reading:
                running = task or connection.commands_task
                if running is not None:
                    self._pause_reading_until(running)
        elif opcode == wsframe.OP_PING:
            self._write(wsframe.control_frame(wsframe.OP_PONG, payload))
        elif opcode == wsframe.OP_PONG:
            self._awaiting_pong = False
        elif opcode == wsframe.OP_CLOSE:
            self._on_close(payload)

    def _on_close(self, payload: bytes) -> None:
        assert self.transport is not None
        try:
            code, _reason = wsframe.parse_close(payload)
        except wsframe.FrameError as exc:
            self._fail(exc.code, exc.reason)
            return
        if not self._closing:
            # Echo the client's code (RFC 6455 §5.5.1), then the server closes TCP.
            self._closing = True
            self.transport.write(wsframe.close_frame(code))
        self.transport.close()

    def _pause_reading_until(self, task: asyncio.Task[None]) -> None:
        assert self.transport is not None
        self._paused_reading = True
        self.transport.pause_reading()

        def resume(_: asyncio.Task[None]) -> None:
            self._paused_reading = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

        task.add_done_callback(resume)

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close with ``code`` (nothing queued is sent)."""
        if self.connection is not None:
            self.connection.request_close(code, reason)
        else:
            self._send_close(code, reason)

    # -- frames to the client ------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        connection = self.connection
        if connection is None or self._closing or self._paused_writing:
            return
        queued = connection.take()
        if queued:
            parts: list[bytes] = []
            header = wsframe.text_header
            for frame in queued:
                if not frame.isascii():
                    try:
                        frame.decode()
                    except UnicodeDecodeError:
                        skipped_bad_frame(connection.id)
                        continue
                parts.append(header(len(frame)))
                parts.append(frame)
            self._write(b"".join(parts))
        if (reason := connection.outbox.close_reason) is not None:
            self._send_close(*reason)
        connection.drained()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send_close(self, code: int, reason: str) -> None:
        """Send our close frame once; the client answers with its own, or time runs out."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.write(wsframe.close_frame(code, reason))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(_CLOSE_TIMEOUT_S, self.transport.abort)

    # -- keepalive ---------------------------------------------------------------------

    def _arm_ping(self) -> None:
        if self.config.ws_ping_interval:
            self._timer = self._loop.call_later(self.config.ws_ping_interval, self._ping)

    def _ping(self) -> None:
        """Every ``ws_ping_interval`` a ping; no pong within ``ws_ping_timeout``: the peer is gone."""
        if self._closing or self.transport is None:
            return
        self._awaiting_pong = True
        self._write(wsframe.control_frame(wsframe.OP_PING, b"magi"))
        timeout = self.config.ws_ping_timeout
        if timeout:
            self._timer = self._loop.call_later(timeout, self._check_pong)
        else:
            self._arm_ping()

    def _check_pong(self) -> None:
        if self._closing or self.transport is None:
            return
        if self._awaiting_pong:
            logger.info("connection %s: no pong; closing", self.connection.id if self.connection else "")
            self.transport.abort()
            return
        self._arm_ping()


_TRUSTED: dict[str, _TrustedHosts] = {}


def _trusted_hosts(allowed: list[str] | str) -> _TrustedHosts:
    """uvicorn's trust rule for forwarding headers, built once per setting."""
    key = allowed if isinstance(allowed, str) else ",".join(allowed)
    trusted = _TRUSTED.get(key)
    if trusted is None:
        trusted = _TRUSTED[key] = _TrustedHosts(allowed)
    return trusted
