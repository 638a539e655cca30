"""The error tree, and the one place that maps errors to what a client sees.

::

    GatewayError
     ├── ProtocolError          the client sent something we cannot act on
     │    ├── FrameTooLarge
     │    └── TooManyAgents
     ├── AuthenticationFailed   bad appid/token (close 4001)
     ├── SessionNotFound        unknown or expired session, or another app's
     ├── RateLimited            too many messages on one connection, or sessions for one appid
     ├── TooManySessions        an appid's quota of running sessions is used up
     ├── TooManyViewers         a session has ``max_viewers_per_session`` viewers already
     ├── BackendUnavailable     Redis unreachable; converted at the Redis boundary
     ├── BackendCommandError    Redis refused a command (a bug or bad data): not retried
     └── AgentError             raised by an agent; its text becomes ``data.error``

Every error a client can see has a stable machine ``code``; its ``str()`` is the
human text sent to clients and therefore never contains internal exception text.
Error frames are built in ``core.frames``.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_ADMIN_DISCONNECT",
    "CLOSE_AUTH_FAILED",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TRY_AGAIN_LATER",
    "AgentError",
    "AuthenticationFailed",
    "BackendCommandError",
    "BackendUnavailable",
    "FrameTooLarge",
    "GatewayError",
    "ProtocolError",
    "RateLimited",
    "SessionNotFound",
    "TooManyAgents",
    "TooManySessions",
    "TooManyViewers",
    "http_status",
]

#: WebSocket close code sent after an authentication failure.
CLOSE_AUTH_FAILED = 4001
#: Close code for connections closed by ``magi-gateway admin disconnect-*``.
CLOSE_ADMIN_DISCONNECT = 4002
#: Close code for a client whose outbound buffer overflowed (RFC 6455 "try again later").
CLOSE_TRY_AGAIN_LATER = 1013
#: Close code sent to clients when the gateway shuts down.
CLOSE_SERVICE_RESTART = 1012


class GatewayError(Exception):
    """Base of every error raised by Magi Gateway."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, session_id: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        #: The session the error is about, echoed in the error frame.
        self.session_id = session_id
        #: The client's ``request_id`` of the message that failed, echoed in the error frame.
        self.request_id: str | None = None


class ProtocolError(GatewayError):
    """A client frame is invalid: bad JSON, unknown type, missing or bad field."""

    code = "invalid_message"


class FrameTooLarge(ProtocolError):
    """A client frame exceeds ``max_frame_bytes``."""

    code = "frame_too_large"


class TooManyAgents(ProtocolError):
    """A judgement names more agents than ``max_agents_per_request``."""

    code = "too_many_agents"


class AuthenticationFailed(GatewayError):
    """The appid/token pair is not valid now."""

    code = "auth_failed"


class SessionNotFound(GatewayError):
    """The session does not exist, has expired, or belongs to another appid."""

    code = "session_not_found"


class RateLimited(GatewayError):
    """The connection sends messages faster than ``max_messages_per_s``."""

    code = "rate_limited"


class TooManySessions(GatewayError):
    """The appid has ``max_sessions_per_app`` sessions running (across every instance)."""

    code = "too_many_sessions"


class TooManyViewers(GatewayError):
    """A session is followed by ``max_viewers_per_session`` connections (across every instance)."""

    code = "too_many_viewers"


class BackendUnavailable(GatewayError):
    """Redis cannot be reached; the operation may be retried later."""

    code = "backend_unavailable"


class BackendCommandError(GatewayError):
    """Redis answered a command with an error that retrying cannot cure (wrong type, bad
    argument, script error): surfaced as ``internal_error``, logged, never retried as an outage.

    Its text is the generic one; the Redis error is its ``__cause__``, for the logs.
    """

    code = "internal_error"


class AgentError(GatewayError):
    """Raised by an agent to fail a judgement with a message the client may read."""

    code = "agent_error"


#: HTTP statuses of the ``/v1`` API by error code; any other code is a 400.
_HTTP_STATUS = {
    "auth_failed": 401,
    "auth_throttled": 429,
    "session_not_found": 404,
    "session_completed": 409,
    "frame_too_large": 413,
    "rate_limited": 429,
    "too_many_sessions": 429,
    "too_many_connections": 429,
    "too_many_streams": 503,
    "too_many_viewers": 429,
    "service_restart": 503,
    "backend_unavailable": 503,
    "internal_error": 500,
}


def http_status(code: str) -> int:
    """The HTTP status of an error with ``code`` (the ``/v1`` API's answer to it)."""
    return _HTTP_STATUS.get(code, 400)
