"""The auth-failure throttle against a ``magi-gateway serve`` subprocess (#12 item 5): keyed by
(client address, appid), and the client address taken from ``X-Forwarded-For`` only when the
peer is a configured proxy (``FORWARDED_ALLOW_IPS``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
from websockets.sync.client import connect

from ._support import SECRET, GatewayHandle, make_token, spawn_gateway, stop_process

MAX_FAILURES = 3
SpawnGateway = Callable[..., GatewayHandle]


@pytest.fixture
def throttled_gateway(redis_url: str, key_prefix: str) -> Iterator[SpawnGateway]:
    started: list[GatewayHandle] = []

    def start(**env: str) -> GatewayHandle:
        handle = spawn_gateway(
            {
                "REDIS_URL": redis_url,
                "REDIS_KEY_PREFIX": key_prefix,
                "FIXED_SECRET": SECRET,
                "MAX_AUTH_FAILURES_PER_MIN": str(MAX_FAILURES),
                **env,
            },
            log_level="warning",
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        assert handle.process is not None
        stop_process(handle.process)


def attempt(handle: GatewayHandle, appid: str, *, valid: bool, forwarded_for: str | None = None) -> str:
    """Connect once: ``connection_established``, or the error code the gateway answered."""
    token = make_token(appid) if valid else "0123456789"
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    with connect(handle.ws_url(appid, token), additional_headers=headers, open_timeout=10) as ws:
        first = orjson.loads(ws.recv(timeout=10))
    code = first.get("type") if "type" in first else first["code"]
    assert isinstance(code, str)
    return code


def test_rotating_x_forwarded_for_from_an_untrusted_peer_does_not_dodge_the_throttle(
    throttled_gateway: SpawnGateway,
) -> None:
    handle = throttled_gateway()  # FORWARDED_ALLOW_IPS unset: no proxy is trusted
    for i in range(MAX_FAILURES):
        assert attempt(handle, "app-a", valid=False, forwarded_for=f"198.51.100.{i}") == "auth_failed"
    # Yet another forwarded address, and the right token: still the same peer, still throttled.
    assert attempt(handle, "app-a", valid=True, forwarded_for="198.51.100.99") == "auth_throttled"
    assert attempt(handle, "app-a", valid=True) == "auth_throttled"


def test_one_appids_failures_do_not_lock_out_another_behind_the_same_address(
    throttled_gateway: SpawnGateway,
) -> None:
    handle = throttled_gateway()
    for _ in range(MAX_FAILURES):
        assert attempt(handle, "app-a", valid=False) == "auth_failed"
    assert attempt(handle, "app-a", valid=True) == "auth_throttled"
    assert attempt(handle, "app-b", valid=True) == "connection_established"
    assert attempt(handle, "app-b", valid=False) == "auth_failed"  # counted for app-b alone


def test_a_trusted_proxys_x_forwarded_for_names_the_client(throttled_gateway: SpawnGateway) -> None:
    handle = throttled_gateway(FORWARDED_ALLOW_IPS="127.0.0.1")
    for _ in range(MAX_FAILURES):
        assert attempt(handle, "app-a", valid=False, forwarded_for="203.0.113.7") == "auth_failed"
    assert attempt(handle, "app-a", valid=True, forwarded_for="203.0.113.7") == "auth_throttled"
    # Another client behind the same proxy is another address.
    assert attempt(handle, "app-a", valid=True, forwarded_for="203.0.113.8") == "connection_established"
