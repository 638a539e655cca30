"""Where ``MagiClient`` gets its tokens: a secret (seed tokens), a JWT, or a token factory."""

from __future__ import annotations

import time
from collections.abc import Callable

from magi_gateway.core.auth import compute_token, minute_of
from magi_gateway.core.jwt_auth import unverified_expiry

__all__ = ["TokenSource", "refresh_delay"]

#: A token from a factory is refreshed this long before its exp (at most; a third of
#: what is left for short-lived tokens).
REFRESH_AHEAD_S = 30.0


class TokenSource:
    """The tokens of one client."""

    __slots__ = ("appid", "secret", "token")

    def __init__(self, appid: str, secret: str | None, token: str | Callable[[], str] | None) -> None:
        if secret is None and token is None:
            raise ValueError("give a secret or a token (a JWT, or a callable returning one)")
        if secret is not None and not appid:
            raise ValueError("a secret needs its appid")
        self.appid = appid
        self.secret = secret
        self.token = token

    def __call__(self) -> str:
        """A token to connect with: the factory's, the JWT given, or this minute's seed token."""
        if callable(self.token):
            return self.token()
        if self.token is not None:
            return self.token
        assert self.secret is not None
        return compute_token(self.appid, self.secret, minute_of(time.time()))

    @property
    def refreshes(self) -> bool:
        """Whether new tokens can be had (a factory): refresh before exp, reconnect after it."""
        return callable(self.token)

    def refresh_due(self, token: str) -> float | None:
        """``token``'s exp when this source can refresh it, else None."""
        return unverified_expiry(token) if self.refreshes else None


def refresh_delay(expires_at: float, now: float) -> float:
    """Seconds to wait before refreshing a token that expires at ``expires_at``."""
    left = expires_at - now
    return max(0.0, left - min(REFRESH_AHEAD_S, left / 3))
