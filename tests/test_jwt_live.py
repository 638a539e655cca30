"""JWTs against a live gateway and Redis, on both ``/ws`` drivers: connect with one, be
refused with an expired one, be closed with 4001 at ``exp``, stay past it by ``refresh``."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt as pyjwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from magi_gateway.agents import demo_agents
from magi_gateway.client import MagiClient
from magi_gateway.core.auth import TokenVerifier
from magi_gateway.core.jwt_auth import JwtVerifier, mint
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import APPID, SECRET, GatewayHandle, recv, send

DRIVERS = ["fast", "websockets-sansio"]
StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]


def token(ttl_s: float = 300, appid: str = APPID, at: float | None = None) -> str:
    return mint(appid, SECRET, now=time.time() if at is None else at, ttl_s=ttl_s)


def url(gateway: GatewayHandle, jwt: str, appid: str | None = APPID) -> str:
    query = f"appid={appid}&token={jwt}" if appid is not None else f"token={jwt}"
    return f"ws://127.0.0.1:{gateway.port}/ws?{query}"


async def expect_close(ws: websockets.ClientConnection, timeout: float = 10) -> int | None:
    """Wait for the close (no frame may come first); its code."""
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code


@pytest.mark.parametrize("driver", DRIVERS)
async def test_connect_with_a_jwt(driver: str, settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings.model_copy(update={"ws_impl": driver}))
    for appid in (APPID, None):  # the query's appid, or the JWT's sub
        async with websockets.connect(url(gateway, token(), appid)) as ws:
            assert (await recv(ws))["type"] == "connection_established"
            await send(ws, {"type": "ping"})
            assert await recv(ws) == {"type": "pong"}
    # A token whose sub is another appid than the query's.
    async with websockets.connect(url(gateway, token(appid="other-app"))) as ws:
        assert await recv(ws) == {"error": "Authentication failed", "code": "auth_failed"}
        assert await expect_close(ws) == 4001


@pytest.mark.parametrize("driver", DRIVERS)
async def test_expired_jwt_is_refused(driver: str, settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings.model_copy(update={"ws_impl": driver}))
    expired = token(ttl_s=60, at=time.time() - 120)
    async with websockets.connect(url(gateway, expired)) as ws:
        assert await recv(ws) == {"error": "Authentication failed", "code": "auth_failed"}
        assert await expect_close(ws) == 4001


@pytest.mark.parametrize("driver", DRIVERS)
async def test_socket_is_closed_with_4001_at_exp(
    driver: str, settings: Settings, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"ws_impl": driver}))
    exp = int(time.time()) + 2  # exp is whole seconds: 1-2 s from now
    jwt = mint(APPID, SECRET, now=exp - 2, ttl_s=2)
    async with websockets.connect(url(gateway, jwt)) as ws:
        assert (await recv(ws))["type"] == "connection_established"
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        assert await recv(ws, timeout=5) == {"error": "Token expired", "code": "token_expired"}
        assert await expect_close(ws) == 4001
        closed_at = time.time()
    assert exp <= closed_at < exp + 1.5
    assert ws.close_reason == "Token expired"


@pytest.mark.parametrize("driver", DRIVERS)
async def test_refresh_before_exp_keeps_the_socket_open(
    driver: str, settings: Settings, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"ws_impl": driver}))
    exp = int(time.time()) + 2
    async with websockets.connect(url(gateway, mint(APPID, SECRET, now=exp - 2, ttl_s=2))) as ws:
        assert (await recv(ws))["type"] == "connection_established"
        # A bad refresh is an error frame; the connection stays.
        await send(ws, {"type": "refresh", "token": token(appid="other-app")})
        failed = await recv(ws)
        assert (failed["code"], failed["error"]) == (
            "auth_failed",
            "Token refresh failed: The sub claim is another appid",
        )
        later = int(time.time()) + 4
        await send(ws, {"type": "refresh", "token": mint(APPID, SECRET, now=later - 4, ttl_s=4)})
        assert await recv(ws) == {"type": "refreshed", "expires_at": later}
        await asyncio.sleep(max(0.0, exp + 0.5 - time.time()))  # past the first exp
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        # The refreshed token ends the connection in turn.
        assert await recv(ws, timeout=6) == {"error": "Token expired", "code": "token_expired"}
        assert await expect_close(ws) == 4001
    assert time.time() >= later


async def test_public_key_jwt_from_the_key_file(
    settings: Settings, start_gateway: StartGateway, tmp_path: Path
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys_file = tmp_path / "keys.pem"
    keys_file.write_bytes(public)
    update = {"jwt_keys_file": str(keys_file), "jwt_audience": "magi", "jwt_issuer": "auth"}
    gateway = await start_gateway(settings.model_copy(update=update))
    now = int(time.time())
    claims = {"sub": APPID, "exp": now + 60, "aud": "magi", "iss": "auth"}
    good = pyjwt.encode(claims, key, "EdDSA")
    async with websockets.connect(url(gateway, good, None)) as ws:
        assert (await recv(ws))["type"] == "connection_established"
    wrong_aud = pyjwt.encode({**claims, "aud": "other"}, key, "EdDSA")
    async with websockets.connect(url(gateway, wrong_aud, None)) as ws:
        assert (await recv(ws))["code"] == "auth_failed"
        assert await expect_close(ws) == 4001


async def test_client_with_a_token_factory_refreshes_before_exp(
    settings: Settings, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings)
    minted: list[str] = []

    def factory() -> str:
        minted.append(token(ttl_s=2))
        return minted[-1]

    client = MagiClient(f"ws://127.0.0.1:{gateway.port}/ws", token=factory)
    async with client:
        first_connection = client.connection_id
        await asyncio.sleep(3.5)  # past the first token's exp and the second's
        await client.ping()
        assert client.connection_id == first_connection  # refreshed, never reconnected
        assert client.reconnects == 0
    assert len(minted) >= 3


async def test_client_with_a_token_factory_reconnects_after_expiry(
    settings: Settings, start_gateway: StartGateway
) -> None:
    """A refresh the gateway refuses: closed at exp (token_expired, 4001), then a new token."""
    gateway = await start_gateway(settings)
    tokens = iter([token(ttl_s=2), token(appid="other-app"), token()])
    client = MagiClient(f"ws://127.0.0.1:{gateway.port}/ws", token=lambda: next(tokens))
    async with client:
        first_connection = client.connection_id
        async with asyncio.timeout(10):
            while client.reconnects == 0:
                await asyncio.sleep(0.05)
        await client.ping()
        assert client.connection_id != first_connection


async def test_client_with_a_fixed_jwt(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings)
    async with MagiClient(f"ws://127.0.0.1:{gateway.port}/ws", appid=APPID, token=token()) as client:
        await client.ping()


async def _cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("FIXED_SECRET", "APP_SECRETS")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "magi_gateway",
        *args,
        env={**env, "COLUMNS": "120"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    return output.decode()


async def test_cli_mints_a_jwt_and_asks_with_it(
    settings: Settings, start_gateway: StartGateway, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    gateway = await start_gateway(settings)
    await start_worker(demo_agents(delay_s=0.01))
    printed = (await _cli("token", APPID, "--secret", SECRET, "--jwt", "--ttl", "120")).strip()
    claims = JwtVerifier(TokenVerifier(SECRET)).verify(printed, APPID, time.time())
    assert claims.appid == APPID
    assert time.time() + 100 < claims.expires_at <= time.time() + 120
    answer = await _cli("ask", "--url", f"ws://127.0.0.1:{gateway.port}/ws", "--token", printed, "Tea?")
    for name in ("MELCHIOR", "BALTHASAR", "CASPER", "VERDICT: APPROVE"):
        assert name in answer, answer
