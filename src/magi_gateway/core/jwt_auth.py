"""JWTs as tokens, sans-I/O: the checks of a token with two dots (Centrifugo-style).

A token with two dots is a JWT. Its signature is checked with a key picked by the
*kind* of algorithm, never with whatever the header asks for:

- ``HS256``/``HS384``/``HS512``: the appid's secret (``APP_SECRETS`` / ``FIXED_SECRET``,
  ``TokenVerifier.secret_for``);
- ``RS*``/``PS*``/``ES*``/``EdDSA``: a public key of ``JWT_KEYS_FILE`` whose type fits the
  algorithm (``core.jwt_keys``), the one named by ``kid`` when the token names one;
- anything else (``none`` included): refused.

Claims: the appid is ``sub`` (it must equal the ``appid`` the client gave, when it gave
one); ``exp`` is required and is when the connection ends; ``nbf`` and ``iat`` may be
up to ``TOKEN_SKEW_MINUTES`` in the future; ``aud`` and ``iss`` are checked when
``JWT_AUDIENCE`` / ``JWT_ISSUER`` are set. When ``APP_SECRETS`` is set, only its appids
are admitted, whatever signed the token. Time is passed in, as everywhere in the core.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from magi_gateway.core.auth import TokenVerifier
from magi_gateway.core.errors import AuthenticationFailed
from magi_gateway.core.ids import AppId
from magi_gateway.core.jwt_keys import ASYMMETRIC_ALGORITHMS, EMPTY_KEYS, KeySet

__all__ = ["HMAC_ALGORITHMS", "MAX_JWT_CHARS", "Claims", "JwtVerifier", "is_jwt", "mint", "unverified_expiry"]

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
#: Longer tokens are refused before any parsing (a bound on the work one handshake costs).
MAX_JWT_CHARS = 8192


def is_jwt(token: str) -> bool:
    """Whether ``token`` is a JWT (two dots) rather than a seed-scheme token."""
    return token.count(".") == 2


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid JWT establishes."""

    appid: AppId
    #: ``exp``, UNIX seconds: the connection is closed then unless refreshed.
    expires_at: float


def _rejected(reason: str) -> AuthenticationFailed:
    # The reason is ours (never a library's text): it may be shown to the client.
    return AuthenticationFailed(reason)


def _number(payload: dict[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _rejected(f"The {claim} claim must be a number")
    return float(value)


class JwtVerifier:
    """Checks JWTs for the appids of one ``TokenVerifier``, with the keys of ``keys()``."""

    __slots__ = ("audience", "issuer", "keys", "leeway_s", "tokens")

    def __init__(
        self,
        tokens: TokenVerifier,
        keys: Callable[[], KeySet] = lambda: EMPTY_KEYS,
        *,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self.tokens = tokens
        #: The current key set (the server's key file reader re-reads it when it changes).
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = 60.0 * tokens.skew_minutes

    def verify(self, token: str, appid: str, now: float) -> Claims:
        """The claims of ``token`` for ``appid`` ("" if the client gave none) at ``now``
        (UNIX seconds); raise ``AuthenticationFailed`` saying why not."""
        if len(token) > MAX_JWT_CHARS:
            raise _rejected(f"Token longer than {MAX_JWT_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _rejected("Malformed token") from None
        algorithm = header.get("alg")
        if algorithm in HMAC_ALGORITHMS:
            claimed = appid or _unverified_subject(token)
            if not claimed:
                raise _rejected("The sub claim (the appid) is required")
            secret = self.tokens.secret_for(claimed)
            keys: list[Any] = [secret] if secret else []
        elif isinstance(algorithm, str) and algorithm in ASYMMETRIC_ALGORITHMS:
            kid = header.get("kid")
            found = self.keys().candidates(algorithm, kid if isinstance(kid, str) else None)
            keys = [k.key for k in found]
        else:
            raise _rejected("Token algorithm not accepted")
        payload = self._decode(token, algorithm, keys)
        return self._claims(payload, appid, now)

    def _decode(self, token: str, algorithm: str, keys: list[Any]) -> dict[str, Any]:
        options: Any = {
            # Times are checked by _claims, against the ``now`` given.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self.audience is not None,
            "verify_iss": self.issuer is not None,
        }
        for key in keys:
            try:
                with warnings.catch_warnings():
                    # Seed-scheme secrets are short by design; the operator chose them.
                    warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                    payload: dict[str, Any] = jwt.decode(
                        token,
                        key,
                        algorithms=[algorithm],
                        options=options,
                        audience=self.audience,
                        issuer=self.issuer,
                    )
                return payload
            except jwt.InvalidSignatureError:
                continue  # another key of the set may have signed it
            except jwt.InvalidAudienceError:
                raise _rejected("Token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise _rejected("Token issuer not accepted") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _rejected(f"The {exc.claim} claim is required") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise _rejected("Token not accepted") from None
        raise _rejected("Signature verification failed")

    def _claims(self, payload: dict[str, Any], appid: str, now: float) -> Claims:
        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _rejected("The sub claim (the appid) is required")
        if appid and subject != appid:
            raise _rejected("The sub claim is another appid")
        if self.tokens.app_secrets and subject not in self.tokens.app_secrets:
            raise _rejected("Unknown appid")
        expires_at = _number(payload, "exp")
        if expires_at is None:
            raise _rejected("The exp claim is required")
        if expires_at <= now:
            raise _rejected("Token expired")
        for claim in ("nbf", "iat"):
            at = _number(payload, claim)
            if at is not None and at > now + self.leeway_s:
                raise _rejected(f"Token not valid yet ({claim})")
        return Claims(AppId(subject), expires_at)


def _unverified_subject(token: str) -> str:
    """``sub`` before the signature is checked: only to pick the secret to check it with."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    subject = payload.get("sub")
    return subject if isinstance(subject, str) else ""


def mint(
    appid: str,
    secret: str,
    *,
    now: float,
    ttl_s: float,
    audience: str | None = None,
    issuer: str | None = None,
    algorithm: str = "HS256",
) -> str:
    """An HS-signed JWT for ``appid`` valid from ``now`` for ``ttl_s`` seconds."""
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"mint signs with HS256/384/512, not {algorithm}")
    claims: dict[str, Any] = {"sub": appid, "iat": int(now), "exp": int(now + ttl_s)}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=algorithm)


def unverified_expiry(token: str) -> float | None:
    """A JWT's ``exp`` without checking it (a client planning its refresh), or None."""
    if not is_jwt(token):
        return None
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)
