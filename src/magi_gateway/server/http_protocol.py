"""The gateway's HTTP protocol for uvicorn: its httptools protocol with the limits of an edge.

uvicorn's own protocol waits forever for a request's headers and buffers headers of any
size (a slowloris holds a socket, and memory, as long as it likes); a WebSocket upgrade
whose request line is over 8 KB is handed to the WebSocket parser, which gives up
without an answer. This subclass adds, per connection:

- **a handshake timeout** (``HANDSHAKE_TIMEOUT_S``): a connection that has not sent
  complete request headers that long after it opened (or after its previous request,
  on a kept-alive connection) is closed. For ``/ws`` the headers are the handshake: the
  gateway accepts the upgrade as soon as it has them;
- **bounded request heads**: a request line or a header line over 8 KiB, more than 100
  headers, or more than 64 KiB of head is answered ``431`` and the connection closed,
  before anything reaches the application or the WebSocket parser;
- **a connection limit per instance** (``MAX_CONNECTIONS``, HTTP and WebSocket together):
  above it a request is answered ``503`` (with ``Retry-After``) and the connection
  closed; for ``/ws`` that is the answer to the upgrade, so no WebSocket opens.
  ``/healthz`` is exempt, so a full instance is not restarted by its liveness probe.

It also hands each request a ``StreamControl`` (ASGI scope extension ``magi.stream``), for
responses that stream for minutes (``/v1`` event streams): ``closing`` is set when the
server shuts down (uvicorn waits for every response to end), and ``abort`` drops a
connection whose client stopped reading (closing it would wait for the client to read).

``magi-gateway serve`` and ``up`` use it (``http_protocol(settings)``); with plain
``uvicorn magi_gateway.main:app`` pass ``--http magi_gateway.server.http_protocol:GatewayHttpProtocol``
(its limits then come from the environment). It relies on uvicorn internals, hence the
``uvicorn<0.56`` bound in ``constraints.txt``: ``HttpToolsProtocol`` and its
``__init__`` arguments, ``connection_made``/``connection_lost``, ``data_received``
(rewritten here from uvicorn's, calling ``_unset_keepalive_if_required``,
``_should_upgrade``, ``handle_websocket_upgrade``, ``_unsupported_upgrade_warning`` and
``send_400_response``), the parser callbacks ``on_message_begin``/``on_url``/``on_header``/
``on_headers_complete``, and the attributes ``parser``, ``url``, ``transport``, ``loop``,
``logger``, ``connections`` and ``server_state.default_headers``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from magi_gateway.server import metrics
from magi_gateway.server.plain_http import plain_response
from magi_gateway.settings import Settings

__all__ = ["STREAM_CONTROL", "EdgeLimits", "GatewayHttpProtocol", "StreamControl", "http_protocol"]

#: The WebSocket parser's own line limit (websockets' ``MAX_LINE_LENGTH``); uvicorn hands it
#: the request line and each header as ``name: value``, so nothing longer may pass.
MAX_LINE_BYTES = 8192
#: Fewer than the WebSocket parser's ``MAX_NUM_HEADERS`` (128).
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024
#: Paths answered even when the instance is at ``MAX_CONNECTIONS``.
_EXEMPT_PATHS = (b"/healthz",)


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """What one connection may take before it is answered and closed."""

    handshake_timeout_s: float = 10.0
    max_connections: int = 16384

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        """The limits ``settings`` names."""
        return cls(handshake_timeout_s=settings.handshake_timeout_s, max_connections=settings.max_connections)


#: The ASGI scope extension holding the request's ``StreamControl``.
STREAM_CONTROL = "magi.stream"


class StreamControl:
    """What a long streaming response may ask of its connection."""

    __slots__ = ("_transport", "closing")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        #: Set when the server shuts down: a streaming response should end now.
        self.closing = asyncio.Event()

    def abort(self) -> None:
        """Drop the connection at once, discarding what the client has not read."""
        self._transport.abort()


class _Refused(Exception):
    """Raised in a parser callback: the request is answered with ``_refusal`` instead."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a handshake timeout, bounded heads, a connection limit."""

    #: Set per server by ``http_protocol``; unset, built from the environment on first use.
    limits: ClassVar[EdgeLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        cls = type(self)
        if cls.limits is None:
            cls.limits = EdgeLimits.from_settings(Settings())
        self._limits: EdgeLimits = cls.limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_open = True  # waiting for (the rest of) a request's headers
        self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0
        self._refusal: tuple[int, str] | None = None
        self._control: StreamControl | None = None

    # -- the handshake timeout -------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._limits.handshake_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_open and not self.transport.is_closing():
            # Debug only: a slowloris would flood the log; the counter says how many.
            self.logger.debug("closing a connection that sent no complete request headers in time")
            metrics.EDGE_REFUSALS.labels("handshake_timeout").inc()
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def shutdown(self) -> None:
        super().shutdown()
        if self._control is not None:
            self._control.closing.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    # -- bounded heads and the connection limit ------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # uvicorn's ``data_received``, with the refusals answered as such (not as a 400).
        if self._refusal is not None:
            return  # answered already; the connection is closing
        if self._head_open:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if self._refusal is not None and isinstance(exc.__context__, _Refused):
                self._refuse(*self._refusal)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        # The parser keeps a header it has not finished in memory of its own: count raw bytes.
        if self._head_open and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "Request header fields too large")

    def _refuse_in_callback(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise _Refused(message)  # the parser stops; ``data_received`` answers

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._control = StreamControl(self.transport)
        self.scope["extensions"] = {STREAM_CONTROL: self._control}  # type: ignore[dict-item]
        self._head_open = True
        self._header_count = 0
        self._header_size = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_LINE_BYTES - len(b"OPTIONS  HTTP/1.1\r\n"):
            self._refuse_in_callback(431, "Request line too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + len(b": \r\n")
        self._header_count += 1
        self._header_size += line
        if line > MAX_LINE_BYTES or self._header_count > MAX_HEADERS or self._header_size > MAX_HEAD_BYTES:
            self._refuse_in_callback(431, "Request header fields too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        self._disarm_head_timer()
        at_limit = len(self.connections) > self._limits.max_connections  # this one included
        if at_limit and self.url.split(b"?", 1)[0] not in _EXEMPT_PATHS:
            self.logger.debug("refusing a request: MAX_CONNECTIONS (%d) open", self._limits.max_connections)
            self._refuse_in_callback(503, "Too many connections")
        super().on_headers_complete()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` and close the connection."""
        self._refusal = (status, message)
        self._disarm_head_timer()
        metrics.EDGE_REFUSALS.labels("too_many_connections" if status == 503 else "head_too_large").inc()
        headers = list(self.server_state.default_headers)
        if status == 503:
            headers.append((b"retry-after", b"1"))
        self.transport.write(plain_response(status, message, headers))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Half-close and discard what the client still sends: closing with unread data would
        # reset the connection, and the client could lose the answer. It closes when the
        # client closes its side (asyncio's default on EOF), or after the handshake timeout.
        self.transport.write_eof()
        self._head_timer = self.loop.call_later(self._limits.handshake_timeout_s, self.transport.close)


def http_protocol(settings: Settings) -> type[GatewayHttpProtocol]:
    """The protocol class for a server with ``settings``' limits (``uvicorn.Config(http=…)``)."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": EdgeLimits.from_settings(settings)})
