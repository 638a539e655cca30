"""One client connection's inbound side, sans-I/O: client frames in, what to do out.

In the style of python-websockets' ``protocol.py``: the driver feeds each text frame
the client sent to ``ClientProtocol.receive`` with the time, and gets a ``Received``
back saying what to do —

- ``reply``: a frame to send now, needing no I/O (``pong``, ``refreshed``, or the error
  for a frame that was rate limited, malformed or over a limit), echoing the message's
  ``request_id`` when it had one;
- ``command``: a message whose work needs Redis (``agent_judgement``, ``resume``,
  ``cancel``, ``get_agents``); the driver runs it and, should it fail, sends the
  frame ``failed`` builds.

The order of the checks is the protocol's: the message rate first (a flood costs
no parsing), then parsing and the limits. Nothing here raises on bad input.

A connection speaks the original system's dialect (``original``) from the first message
only that dialect has: a judgement in its form, or ``get_voters``. From then on every
accepted message is acknowledged (``ack``: ``message_received``, before its reply) and
bad JSON is answered ``Invalid JSON format``, as the original gateway did; a connection
that never sends such a message sees the seed protocol only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from magi_gateway.core import dialect, frames, protocol
from magi_gateway.core.errors import AuthenticationFailed, GatewayError, RateLimited
from magi_gateway.core.ids import AppId, ConnectionId
from magi_gateway.core.jwt_auth import JwtVerifier, is_jwt
from magi_gateway.core.ratelimit import TokenBucket

__all__ = ["ClientProtocol", "Received"]


@dataclass(frozen=True, slots=True)
class Received:
    """What one client frame asks of the driver."""

    #: The message type, or ``invalid`` / ``rate_limited`` (for the counters).
    kind: str
    #: A message whose work needs I/O, to run (then ``failed`` on an error).
    command: protocol.ClientMessage | None = None
    #: A frame to send at once, and its type (``pong`` or ``error``).
    reply: bytes | None = None
    reply_kind: bytes = b""
    #: The error code, when ``reply`` is an error.
    error: str | None = None
    #: To send before anything else (the original dialect's ``message_received``).
    ack: bytes | None = None


_PONG = Received("ping", reply=frames.PONG, reply_kind=b"pong")


class ClientProtocol:
    """The client side of one authenticated connection: who it is and how fast it may talk."""

    __slots__ = ("appid", "expires_at", "id", "jwt", "limits", "on_expiry_change", "original", "rate_limit")

    def __init__(
        self,
        connection_id: ConnectionId,
        appid: AppId,
        limits: protocol.Limits,
        rate_limit: TokenBucket | None = None,
        *,
        jwt: JwtVerifier | None = None,
        expires_at: float | None = None,
    ) -> None:
        self.id = connection_id
        self.appid = appid
        self.limits = limits
        #: Limits the client's messages (overflow policy: drop the frame, answer rate_limited).
        self.rate_limit = rate_limit
        #: Checks the tokens of ``refresh`` messages (None: refresh is refused).
        self.jwt = jwt
        #: When the connection's JWT expires (UNIX seconds); None: never (a seed token).
        self.expires_at = expires_at
        #: Called after a refresh moved ``expires_at`` (the driver re-arms its timer).
        self.on_expiry_change: Callable[[], None] | None = None
        #: The client speaks the original system's dialect (see the module's docstring).
        self.original = False

    def receive(self, frame: str | bytes, now: float, wall_now: float | None = None) -> Received:
        """Check and parse one client frame (``now``: monotonic seconds; ``wall_now``: UNIX
        seconds, to check the token of a ``refresh``; without it a refresh is refused)."""
        if self.rate_limit is not None and not self.rate_limit.allow(now):
            limited = RateLimited("Too many messages; slow down")
            # Which of its messages was dropped, so that a client can match the error to it.
            limited.request_id = protocol.request_id_of(frame, self.limits)
            return _error("rate_limited", limited)
        try:
            message = protocol.parse_client_frame(frame, self.limits)
        except GatewayError as exc:
            if self.original and exc.code == "invalid_json":
                return Received("invalid", reply=dialect.INVALID_JSON, reply_kind=b"error", error=exc.code)
            return _error("invalid", exc)
        received = self._answer(message, wall_now)
        if not self.original:
            self.original = isinstance(message, protocol.GetVoters) or (
                isinstance(message, protocol.JudgementRequest) and message.original
            )
        if self.original:
            return replace(received, ack=dialect.message_received(message.type))
        return received

    def _answer(self, message: protocol.ClientMessage, wall_now: float | None) -> Received:
        if isinstance(message, protocol.Ping):
            if message.request_id is None:
                return _PONG
            return Received("ping", reply=frames.pong(message.request_id), reply_kind=b"pong")
        if isinstance(message, protocol.Refresh):
            return self.refresh(message.token, wall_now, message.request_id)
        return Received(message.type, command=message)

    def refresh(self, token: str, now: float | None, request_id: str | None = None) -> Received:
        """Take a new JWT for this appid: the connection now ends at its ``exp``."""
        try:
            if self.jwt is None or now is None or not is_jwt(token):
                raise AuthenticationFailed("A refresh needs a JWT")
            claims = self.jwt.verify(token, self.appid, now)
        except AuthenticationFailed as exc:
            refused = AuthenticationFailed(f"Token refresh failed: {exc}")
            refused.request_id = request_id
            return _error("refresh", refused)
        self.expires_at = claims.expires_at
        if self.on_expiry_change is not None:
            self.on_expiry_change()
        return Received(
            "refresh", reply=frames.refreshed_frame(claims.expires_at, request_id), reply_kind=b"refreshed"
        )

    @staticmethod
    def failed(command: protocol.ClientMessage, exc: GatewayError) -> Received:
        """The error frame for a ``command`` whose work failed with ``exc``.

        A failed ``resume`` or ``cancel`` says which session it was about, so that a
        client can retry that one.
        """
        if exc.session_id is None and isinstance(command, protocol.Resume | protocol.Cancel):
            exc.session_id = command.session_id
        if exc.request_id is None:
            exc.request_id = command.request_id
        return _error(command.type, exc)

    @staticmethod
    def crashed(command: protocol.ClientMessage) -> Received:
        """The error frame for a ``command`` whose work failed unexpectedly (a bug)."""
        return Received(
            command.type,
            reply=frames.internal_error_frame(command.request_id),
            reply_kind=b"error",
            error="internal_error",
        )


def _error(kind: str, exc: GatewayError) -> Received:
    return Received(kind, reply=frames.error_frame(exc), reply_kind=b"error", error=exc.code)
