"""Token checks for the seed scheme (sans-I/O: pure functions of appid, secret and time).

A token is ``sha256(f"{appid}{secret}{minute}").hexdigest()[:10]`` with
``minute = int(time.time() // 60)``. The gateway accepts the current minute and
``skew_minutes`` previous ones, comparing in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["FailureThrottle", "TokenVerifier", "compute_token", "minute_of"]

TOKEN_LENGTH = 10


def minute_of(timestamp: float) -> int:
    """The token minute of a UNIX timestamp."""
    return int(timestamp // 60)


def compute_token(appid: str, secret: str, minute: int) -> str:
    """The token for ``appid`` in ``minute``."""
    raw = f"{appid}{secret}{minute}".encode()
    return hashlib.sha256(raw).hexdigest()[:TOKEN_LENGTH]


@dataclass(frozen=True)
class TokenVerifier:
    """Checks appid/token pairs against ``FIXED_SECRET`` or per-app secrets.

    When ``app_secrets`` is non-empty it is authoritative: only its appids may
    connect, each with its own secret. Otherwise every appid shares ``fixed_secret``.
    With neither configured, nothing authenticates.
    """

    fixed_secret: str | None
    app_secrets: Mapping[str, str] = field(default_factory=dict)
    skew_minutes: int = 1

    def secret_for(self, appid: str) -> str | None:
        """The secret ``appid`` signs with, or None when it may not connect."""
        if self.app_secrets:
            return self.app_secrets.get(appid)
        return self.fixed_secret

    def verify(self, appid: str, token: str, now: float) -> bool:
        """Whether ``token`` is valid for ``appid`` at time ``now``."""
        secret = self.secret_for(appid)
        if not appid or secret is None or len(token) != TOKEN_LENGTH:
            return False
        minute = minute_of(now)
        valid = False
        # Check every accepted minute, without early exit, so timing does not tell which.
        for offset in range(self.skew_minutes + 1):
            expected = compute_token(appid, secret, minute - offset)
            valid |= hmac.compare_digest(expected.encode(), token.encode())
        return valid


#: Characters of an appid kept in a throttle key (appids are client input of any length).
_KEY_APPID_CHARS = 128


class FailureThrottle:
    """Counts authentication failures per (client address, appid) in a sliding window.

    After ``max_failures`` failures within ``window_s`` seconds an address is refused
    for that appid until its oldest failure leaves the window; the address can still
    authenticate for other appids, so one tenant's failures (or an attacker's, made in a
    tenant's name) never lock another tenant out of a shared address (a NAT, a proxy).
    At most ``max_addresses`` (address, appid) pairs are tracked; past that the least
    recently failing one is forgotten (overflow policy: evict oldest).
    """

    def __init__(
        self, *, max_failures: int = 10, window_s: float = 60.0, max_addresses: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = self._failures.get(key)
        if not times:
            return []
        cutoff = now - self.window_s
        while times and times[0] <= cutoff:
            times.pop(0)
        if not times:
            del self._failures[key]
        return times

    def is_blocked(self, address: str, now: float, appid: str = "") -> bool:
        """Whether ``address`` has failed too often recently (for ``appid``)."""
        return len(self._recent((address, appid[:_KEY_APPID_CHARS]), now)) >= self.max_failures

    def record_failure(self, address: str, now: float, appid: str = "") -> None:
        """Remember one failure of ``address`` (for ``appid``)."""
        key = (address, appid[:_KEY_APPID_CHARS])
        times = self._recent(key, now)
        if not times:
            self._failures[key] = times
        times.append(now)
        del times[: -self.max_failures]
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
