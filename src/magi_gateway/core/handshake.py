"""Admitting a WebSocket client, sans-I/O: the checks of a handshake, in order.

Every driver asks ``Admission.check`` and acts on the answer: ``None`` means accept
and register the connection; a ``Refusal`` says what to send and how to close. The
order is the protocol's (DESIGN.md §2):

1. a browser ``Origin`` outside ``CORS_ORIGINS`` → refused before the upgrade (HTTP 403);
2. an (address, appid) pair that failed too often → ``auth_throttled``, close 4001;
3. a bad appid/token → ``auth_failed``, close 4001 (and the failure is counted); a token
   with two dots is a JWT (``core.jwt_auth``), whose ``sub`` is the appid and whose
   ``exp`` ends the connection;
4. an instance shutting down → close 1012;
5. an appid with ``MAX_CONNECTIONS_PER_APP`` connections here → ``too_many_connections``, 1013.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from magi_gateway.core import frames
from magi_gateway.core.auth import FailureThrottle, TokenVerifier
from magi_gateway.core.errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    AuthenticationFailed,
)
from magi_gateway.core.ids import AppId
from magi_gateway.core.jwt_auth import JwtVerifier, is_jwt

__all__ = ["CLOSE_ORIGIN_REJECTED", "Admission", "Admitted", "Refusal"]

#: Close code for a browser whose Origin is not in CORS_ORIGINS (sent before accept: HTTP 403).
CLOSE_ORIGIN_REJECTED = 4003


@dataclass(frozen=True, slots=True)
class Refusal:
    """How to turn a client away."""

    code: int
    reason: str
    #: A frame to send before the close (after accepting), if any.
    frame: bytes | None = None
    #: True: refuse the upgrade itself (HTTP 403), nothing is accepted.
    before_accept: bool = False
    #: The authentication-failure reason, for the counters (``throttled``, ``bad_token``).
    auth_failure: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """Who a client authenticated as."""

    appid: AppId
    #: A JWT's ``exp`` (UNIX seconds): the connection closes then unless refreshed.
    expires_at: float | None = None


ORIGIN_REJECTED = Refusal(CLOSE_ORIGIN_REJECTED, "Origin not allowed", before_accept=True)
_AUTH_FAILED = "Authentication failed"
THROTTLED = Refusal(CLOSE_AUTH_FAILED, _AUTH_FAILED, frames.AUTH_THROTTLED, auth_failure="throttled")
BAD_TOKEN = Refusal(CLOSE_AUTH_FAILED, _AUTH_FAILED, frames.AUTH_FAILED, auth_failure="bad_token")
RESTARTING = Refusal(CLOSE_SERVICE_RESTART, "Service restart")
TOO_MANY = Refusal(CLOSE_TRY_AGAIN_LATER, "Too many connections", frames.TOO_MANY_CONNECTIONS)


class Admission:
    """The handshake checks of one gateway instance."""

    __slots__ = ("allowed_origins", "jwt", "throttle", "verifier")

    def __init__(
        self,
        verifier: TokenVerifier,
        throttle: FailureThrottle,
        cors_origins: list[str] | tuple[str, ...],
        jwt: JwtVerifier | None = None,
    ) -> None:
        self.verifier = verifier
        self.throttle = throttle
        #: Checks JWTs (HS* with the verifier's secrets when no other is given).
        self.jwt = jwt if jwt is not None else JwtVerifier(verifier)
        #: None: every origin is allowed (``CORS_ORIGINS=*``).
        self.allowed_origins: frozenset[str] | None = None if "*" in cors_origins else frozenset(cors_origins)

    def check_origin(self, origin: str | None) -> Refusal | None:
        """Step 1, before the upgrade: a browser from another site is refused."""
        if self.allowed_origins is not None and origin and origin not in self.allowed_origins:
            return ORIGIN_REJECTED
        return None

    def check(
        self, peer: str, appid: str, token: str, now: float, *, accepting: bool, at_capacity: bool
    ) -> Refusal | None:
        """Steps 2-5, after the upgrade (``now``: UNIX seconds)."""
        result = self.admit(peer, appid, token, now, accepting=accepting, at_capacity=lambda _: at_capacity)
        return result if isinstance(result, Refusal) else None

    def admit(
        self,
        peer: str,
        appid: str,
        token: str,
        now: float,
        *,
        accepting: bool,
        at_capacity: Callable[[AppId], bool],
    ) -> Admitted | Refusal:
        """Steps 2-5, and who the client is (a JWT may name the appid the query left out)."""
        if self.throttle.is_blocked(peer, now, appid):
            return THROTTLED
        admitted = self.authenticate(appid, token, now)
        if admitted is None:
            self.throttle.record_failure(peer, now, appid)
            return BAD_TOKEN
        if not accepting:
            return RESTARTING
        if at_capacity(admitted.appid):
            return TOO_MANY
        return admitted

    def authenticate(self, appid: str, token: str, now: float) -> Admitted | None:
        """Step 3 alone: a seed-scheme token or a JWT, for ``appid``."""
        if is_jwt(token):
            try:
                claims = self.jwt.verify(token, appid, now)
            except AuthenticationFailed:
                return None
            return Admitted(claims.appid, claims.expires_at)
        if not self.verifier.verify(appid, token, now):
            return None
        return Admitted(AppId(appid))
