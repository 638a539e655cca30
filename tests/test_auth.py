"""Token checks and the failure throttle (sans-I/O), then authentication over a real /ws."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest
import websockets

from magi_gateway.core.auth import FailureThrottle, TokenVerifier, compute_token, minute_of
from magi_gateway.core.errors import CLOSE_AUTH_FAILED

from ._support import APPID, SECRET, GatewayHandle, make_token, recv

# A fixed instant in the middle of a minute, so "now - 60" is exactly the previous minute.
NOW = 1_700_000_030.0
MINUTE = int(NOW // 60)


def seed_token(appid: str, secret: str, minute: int) -> str:
    """The token exactly as the README's client example computes it."""
    return hashlib.sha256(f"{appid}{secret}{minute}".encode()).hexdigest()[:10]


# --- compute_token / minute_of ------------------------------------------------------------


def test_compute_token_matches_the_seed_expression_now() -> None:
    minute = int(time.time() // 60)
    expected = hashlib.sha256(f"{APPID}{SECRET}{minute}".encode()).hexdigest()[:10]
    assert compute_token(APPID, SECRET, minute) == expected


@pytest.mark.parametrize(
    ("appid", "secret", "minute"),
    [("app", "s3cret", 0), ("x", "", 28_333_333), ("ünïcode-app", "päss wörd", MINUTE), ("a" * 200, "b", 1)],
)
def test_compute_token_matches_the_seed_expression(appid: str, secret: str, minute: int) -> None:
    token = compute_token(appid, secret, minute)
    assert token == seed_token(appid, secret, minute)
    assert len(token) == 10
    assert all(c in "0123456789abcdef" for c in token)


def test_minute_of_is_integer_division_by_60() -> None:
    assert minute_of(0.0) == 0
    assert minute_of(59.999) == 0
    assert minute_of(60.0) == 1
    assert minute_of(NOW) == MINUTE
    now = time.time()
    assert minute_of(now) == int(now // 60)


def test_support_make_token_is_the_seed_scheme() -> None:
    assert make_token(APPID, SECRET, at=NOW) == seed_token(APPID, SECRET, MINUTE)


# --- TokenVerifier --------------------------------------------------------------------------


def test_verifier_accepts_current_minute() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE), NOW)


def test_verifier_accepts_real_current_token() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    now = time.time()
    assert verifier.verify(APPID, make_token(APPID, SECRET, at=now), now)


def test_verifier_accepts_previous_minute_with_default_skew() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert verifier.skew_minutes == 1
    assert verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE - 1), NOW)
    assert verifier.verify(APPID, make_token(APPID, SECRET, at=NOW - 60), NOW)


def test_verifier_rejects_two_minutes_back() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert not verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE - 2), NOW)


def test_verifier_rejects_next_minute() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert not verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE + 1), NOW)


def test_verifier_skew_zero_rejects_previous_minute() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET, skew_minutes=0)
    assert verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE), NOW)
    assert not verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE - 1), NOW)


def test_verifier_larger_skew_accepts_that_many_previous_minutes() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET, skew_minutes=3)
    for back in range(4):
        assert verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE - back), NOW)
    assert not verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE - 4), NOW)


def test_verifier_rejects_wrong_secret() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert not verifier.verify(APPID, seed_token(APPID, "other-secret", MINUTE), NOW)


def test_verifier_rejects_wrong_appid() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    token = seed_token("other-app", SECRET, MINUTE)
    assert verifier.verify("other-app", token, NOW)
    assert not verifier.verify(APPID, token, NOW)


def test_verifier_rejects_empty_appid() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    # Even a token computed correctly for the empty appid is refused.
    assert not verifier.verify("", seed_token("", SECRET, MINUTE), NOW)


@pytest.mark.parametrize("length", [0, 1, 9, 11, 64])
def test_verifier_rejects_wrong_length_token(length: int) -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    full = hashlib.sha256(f"{APPID}{SECRET}{MINUTE}".encode()).hexdigest()
    token = (full * 2)[:length]
    assert not verifier.verify(APPID, token, NOW)


def test_verifier_rejects_uppercase_token() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    token = seed_token(APPID, SECRET, MINUTE)
    assert token.upper() != token, "pick a NOW whose token has a hex letter"
    assert not verifier.verify(APPID, token.upper(), NOW)


def test_verifier_rejects_non_ascii_token_without_raising() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET)
    assert not verifier.verify(APPID, "é" * 10, NOW)


def test_app_secrets_restrict_appids_and_use_their_own_secret() -> None:
    verifier = TokenVerifier(fixed_secret=SECRET, app_secrets={"alpha": "sa", "beta": "sb"})
    assert verifier.verify("alpha", seed_token("alpha", "sa", MINUTE), NOW)
    assert verifier.verify("beta", seed_token("beta", "sb", MINUTE), NOW)
    assert verifier.verify("beta", seed_token("beta", "sb", MINUTE - 1), NOW)
    # Each appid only with its own secret.
    assert not verifier.verify("alpha", seed_token("alpha", "sb", MINUTE), NOW)
    assert not verifier.verify("beta", seed_token("beta", "sa", MINUTE), NOW)
    # fixed_secret is ignored when app_secrets is set: neither listed nor unlisted appids use it.
    assert not verifier.verify("alpha", seed_token("alpha", SECRET, MINUTE), NOW)
    assert not verifier.verify(APPID, seed_token(APPID, SECRET, MINUTE), NOW)
    # An unlisted appid cannot connect with any secret.
    assert not verifier.verify("gamma", seed_token("gamma", "sa", MINUTE), NOW)


def test_secret_for() -> None:
    assert TokenVerifier(fixed_secret="f").secret_for("any") == "f"
    restricted = TokenVerifier(fixed_secret="f", app_secrets={"a": "x"})
    assert restricted.secret_for("a") == "x"
    assert restricted.secret_for("b") is None
    assert TokenVerifier(fixed_secret=None).secret_for("a") is None


def test_nothing_authenticates_without_secrets() -> None:
    verifier = TokenVerifier(fixed_secret=None)
    for secret in ("", "None", SECRET):
        assert not verifier.verify(APPID, seed_token(APPID, secret, MINUTE), NOW)
    empty_map = TokenVerifier(fixed_secret=None, app_secrets={})
    assert not empty_map.verify(APPID, seed_token(APPID, "", MINUTE), NOW)


# --- FailureThrottle ------------------------------------------------------------------------


def test_throttle_blocks_after_max_failures_within_window() -> None:
    throttle = FailureThrottle(max_failures=3, window_s=60.0)
    assert not throttle.is_blocked("1.2.3.4", 1000.0)
    throttle.record_failure("1.2.3.4", 1000.0)
    throttle.record_failure("1.2.3.4", 1010.0)
    assert not throttle.is_blocked("1.2.3.4", 1010.0)
    throttle.record_failure("1.2.3.4", 1020.0)
    assert throttle.is_blocked("1.2.3.4", 1020.0)
    assert throttle.is_blocked("1.2.3.4", 1059.0)


def test_throttle_unblocks_when_oldest_failure_leaves_window() -> None:
    throttle = FailureThrottle(max_failures=3, window_s=60.0)
    for t in (1000.0, 1010.0, 1020.0):
        throttle.record_failure("1.2.3.4", t)
    assert throttle.is_blocked("1.2.3.4", 1059.9)
    # At 1060 the failure of 1000 is a full window old: only two remain.
    assert not throttle.is_blocked("1.2.3.4", 1060.0)
    assert not throttle.is_blocked("1.2.3.4", 2000.0)


def test_throttle_failures_spread_over_more_than_window_do_not_block() -> None:
    throttle = FailureThrottle(max_failures=3, window_s=10.0)
    for t in range(0, 100, 6):
        throttle.record_failure("a", float(t))
        assert not throttle.is_blocked("a", float(t))


def test_throttle_is_per_address() -> None:
    throttle = FailureThrottle(max_failures=2, window_s=60.0)
    throttle.record_failure("a", 1.0)
    throttle.record_failure("a", 2.0)
    throttle.record_failure("b", 2.0)
    assert throttle.is_blocked("a", 3.0)
    assert not throttle.is_blocked("b", 3.0)
    assert not throttle.is_blocked("c", 3.0)
    throttle.record_failure("b", 3.0)
    assert throttle.is_blocked("b", 3.0)


def test_throttle_is_per_address_and_appid() -> None:
    throttle = FailureThrottle(max_failures=2, window_s=60.0)
    throttle.record_failure("a", 1.0, "app-a")
    throttle.record_failure("a", 2.0, "app-a")
    assert throttle.is_blocked("a", 3.0, "app-a")
    # The same address for another tenant, and another address for the same tenant: free.
    assert not throttle.is_blocked("a", 3.0, "app-b")
    assert not throttle.is_blocked("b", 3.0, "app-a")


def test_throttle_keys_keep_a_bounded_part_of_long_appids() -> None:
    throttle = FailureThrottle(max_failures=1, window_s=60.0)
    throttle.record_failure("a", 1.0, "x" * 100_000)
    assert throttle.is_blocked("a", 2.0, "x" * 100_000)
    assert all(len(appid) <= 128 for _address, appid in throttle._failures)


def test_throttle_evicts_oldest_addresses_beyond_max() -> None:
    throttle = FailureThrottle(max_failures=1, window_s=60.0, max_addresses=3)
    for i, address in enumerate(["a", "b", "c"]):
        throttle.record_failure(address, float(i))
    assert all(throttle.is_blocked(a, 5.0) for a in "abc")
    # A fourth address evicts the least recently failing one ("a").
    throttle.record_failure("d", 6.0)
    assert not throttle.is_blocked("a", 7.0)
    assert all(throttle.is_blocked(a, 7.0) for a in "bcd")


def test_throttle_eviction_order_follows_most_recent_failure() -> None:
    throttle = FailureThrottle(max_failures=1, window_s=60.0, max_addresses=2)
    throttle.record_failure("a", 1.0)
    throttle.record_failure("b", 2.0)
    throttle.record_failure("a", 3.0)  # "a" is now the most recent
    throttle.record_failure("c", 4.0)  # evicts "b"
    assert throttle.is_blocked("a", 5.0)
    assert not throttle.is_blocked("b", 5.0)
    assert throttle.is_blocked("c", 5.0)


def test_throttle_default_limits() -> None:
    throttle = FailureThrottle()
    for i in range(9):
        throttle.record_failure("x", float(i))
    assert not throttle.is_blocked("x", 9.0)
    throttle.record_failure("x", 9.0)
    assert throttle.is_blocked("x", 9.0)


# --- end to end over /ws --------------------------------------------------------------------

AUTH_FAILED = {"error": "Authentication failed", "code": "auth_failed"}


async def assert_rejected(url: str, code: str = "auth_failed") -> None:
    """The gateway accepts, sends one error frame, then closes with 4001."""
    async with websockets.connect(url) as ws:
        frame = await recv(ws)
        if code == "auth_failed":
            assert frame == AUTH_FAILED
        else:
            assert frame["code"] == code
            assert set(frame) == {"error", "code"}
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CLOSE_AUTH_FAILED == 4001


async def test_ws_valid_token_is_established(gateway: GatewayHandle) -> None:
    async with websockets.connect(gateway.ws_url()) as ws:
        hello = await recv(ws)
        assert hello["type"] == "connection_established"
        assert isinstance(hello["connection_id"], str)
        assert hello["connection_id"]
        await ws.send(orjson.dumps({"type": "ping"}).decode())
        assert await recv(ws) == {"type": "pong"}


async def test_ws_connection_ids_are_distinct(gateway: GatewayHandle) -> None:
    async with websockets.connect(gateway.ws_url()) as a, websockets.connect(gateway.ws_url()) as b:
        assert (await recv(a))["connection_id"] != (await recv(b))["connection_id"]


async def test_ws_bad_token_fails_with_4001(gateway: GatewayHandle) -> None:
    await assert_rejected(gateway.ws_url(token="0123456789"))


async def test_ws_wrong_secret_fails(gateway: GatewayHandle) -> None:
    await assert_rejected(gateway.ws_url(token=make_token(APPID, "not-the-secret")))


async def test_ws_previous_minute_token_accepted(gateway: GatewayHandle) -> None:
    token = make_token(APPID, SECRET, at=time.time() - 60)
    async with websockets.connect(gateway.ws_url(token=token)) as ws:
        assert (await recv(ws))["type"] == "connection_established"


async def test_ws_two_minutes_old_token_rejected(gateway: GatewayHandle) -> None:
    # 150 s back is at least two minutes back whatever the second within the minute is.
    await assert_rejected(gateway.ws_url(token=make_token(APPID, SECRET, at=time.time() - 150)))


@pytest.mark.parametrize(
    "query",
    ["", "?appid=" + APPID, "?token=0123456789", "?appid=&token=0123456789"],
    ids=["no-query", "no-token", "no-appid", "empty-appid"],
)
async def test_ws_missing_credentials_fail(gateway: GatewayHandle, query: str) -> None:
    await assert_rejected(f"ws://127.0.0.1:{gateway.port}/ws{query}")


async def test_ws_missing_token_for_valid_appid_fails(gateway: GatewayHandle) -> None:
    await assert_rejected(f"ws://127.0.0.1:{gateway.port}/ws?appid={APPID}&token=")


async def test_ws_repeated_failures_are_throttled(gateway: GatewayHandle) -> None:
    for _ in range(10):
        await assert_rejected(gateway.ws_url(token="0000000000"))
    # The 11th attempt is refused even with a valid token.
    await assert_rejected(gateway.ws_url(), code="auth_throttled")
    await assert_rejected(gateway.ws_url(), code="auth_throttled")
