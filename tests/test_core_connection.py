"""The sans-I/O connection protocol and handshake: client frames and handshakes in, actions out.

Synchronous tests, no Redis, no event loop, no clock: the time is an argument.
"""

from __future__ import annotations

import orjson

from magi_gateway.core import frames, protocol
from magi_gateway.core.auth import FailureThrottle, TokenVerifier, compute_token, minute_of
from magi_gateway.core.connection import ClientProtocol
from magi_gateway.core.errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    SessionNotFound,
)
from magi_gateway.core.handshake import CLOSE_ORIGIN_REJECTED, Admission
from magi_gateway.core.ids import AppId, ConnectionId, SessionId
from magi_gateway.core.ratelimit import TokenBucket

SID = "0123456789abcdef0123456789abcdef"


def _client(rate: float = 1000.0, burst: int = 1000) -> ClientProtocol:
    return ClientProtocol(ConnectionId("c1"), AppId("app"), protocol.Limits(), TokenBucket(rate, burst, 0.0))


def _reply(received: object) -> dict[str, object]:
    reply = getattr(received, "reply")  # noqa: B009 - typed loosely on purpose
    assert isinstance(reply, bytes)
    decoded = orjson.loads(reply)
    assert isinstance(decoded, dict)
    return decoded


# -- client frames ----------------------------------------------------------------------------------


def test_ping_is_answered_at_once_without_a_command() -> None:
    received = _client().receive(b'{"type": "ping"}', 0.0)
    assert received.command is None
    assert received.reply == frames.PONG
    assert (received.kind, received.reply_kind, received.error) == ("ping", b"pong", None)


def test_a_judgement_becomes_a_command_and_no_reply() -> None:
    frame = b'{"type": "agent_judgement", "agent_ids": ["melchior"], "data": {"user_input": "x"}}'
    received = _client().receive(frame, 0.0)
    assert received.reply is None
    assert isinstance(received.command, protocol.JudgementRequest)
    assert received.command.agent_ids == ("melchior",)
    assert received.kind == "agent_judgement"


def test_bad_json_is_answered_with_an_error_and_counted_as_invalid() -> None:
    received = _client().receive(b"{not json", 0.0)
    assert received.command is None
    assert received.kind == "invalid"
    assert received.reply_kind == b"error"
    assert _reply(received)["code"] == received.error == "invalid_json"


def test_the_rate_limit_is_checked_before_parsing() -> None:
    client = _client(rate=1.0, burst=2)
    assert client.receive(b'{"type": "ping"}', 0.0).reply == frames.PONG
    assert client.receive(b"garbage", 0.0).error == "invalid_json"
    limited = client.receive(b"garbage", 0.0)  # the bucket is empty: not even parsed
    assert (limited.kind, limited.error) == ("rate_limited", "rate_limited")
    assert _reply(limited)["code"] == "rate_limited"
    assert client.receive(b'{"type": "ping"}', 1.0).reply == frames.PONG  # one token back after 1 s


def test_a_failed_resume_names_its_session() -> None:
    command = protocol.Resume(SessionId(SID), 3)
    received = ClientProtocol.failed(command, SessionNotFound("Session not found or expired"))
    reply = _reply(received)
    assert reply == {"error": "Session not found or expired", "code": "session_not_found", "session_id": SID}
    assert received.kind == "resume"


def test_an_unexpected_failure_says_internal_error_only() -> None:
    received = ClientProtocol.crashed(protocol.GetAgents())
    assert _reply(received) == {"error": "Internal server error", "code": "internal_error"}
    assert received.error == "internal_error"


# -- the handshake ------------------------------------------------------------------------------------

NOW = 1_800_000_000.0


def _admission(origins: tuple[str, ...] = ("*",), max_failures: int = 2) -> Admission:
    throttle = FailureThrottle(max_failures=max_failures, window_s=60.0)
    return Admission(TokenVerifier("secret"), throttle, origins)


def _token(appid: str = "app") -> str:
    return compute_token(appid, "secret", minute_of(NOW))


def test_a_good_token_is_admitted() -> None:
    assert _admission().check("1.2.3.4", "app", _token(), NOW, accepting=True, at_capacity=False) is None


def test_origins_are_checked_before_the_upgrade() -> None:
    admission = _admission(origins=("https://ok.example",))
    refusal = admission.check_origin("https://evil.example")
    assert refusal is not None
    assert (refusal.code, refusal.before_accept) == (CLOSE_ORIGIN_REJECTED, True)
    assert admission.check_origin("https://ok.example") is None
    assert admission.check_origin(None) is None  # not a browser


def test_bad_tokens_are_refused_then_throttled_even_with_a_good_one() -> None:
    admission = _admission(max_failures=2)
    for _ in range(2):
        refusal = admission.check("1.2.3.4", "app", "0000000000", NOW, accepting=True, at_capacity=False)
        assert refusal is not None
        assert (refusal.code, refusal.frame, refusal.auth_failure) == (
            CLOSE_AUTH_FAILED,
            frames.AUTH_FAILED,
            "bad_token",
        )
    refusal = admission.check("1.2.3.4", "app", _token(), NOW, accepting=True, at_capacity=False)
    assert refusal is not None
    assert (refusal.frame, refusal.auth_failure) == (frames.AUTH_THROTTLED, "throttled")
    # The window passes: admitted again.
    assert admission.check("1.2.3.4", "app", _token(), NOW + 61, accepting=True, at_capacity=False) is None


def test_credentials_come_before_shutdown_and_capacity() -> None:
    admission = _admission()
    bad = admission.check("1.2.3.4", "app", "0000000000", NOW, accepting=False, at_capacity=True)
    assert bad is not None
    assert bad.auth_failure == "bad_token"
    restarting = admission.check("1.2.3.4", "app", _token(), NOW, accepting=False, at_capacity=True)
    assert restarting is not None
    assert restarting.code == CLOSE_SERVICE_RESTART
    full = admission.check("1.2.3.4", "app", _token(), NOW, accepting=True, at_capacity=True)
    assert full is not None
    assert (full.code, full.frame) == (CLOSE_TRY_AGAIN_LATER, frames.TOO_MANY_CONNECTIONS)
