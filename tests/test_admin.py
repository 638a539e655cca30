"""Admin commands: signing and checks (sans-I/O), then two live gateways on one Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import orjson
import pytest
import websockets

from magi_gateway._util import now_ms
from magi_gateway.cli.admin import send_command
from magi_gateway.client import MagiClient
from magi_gateway.core.admin import MAX_AGE_MS, AdminCommand, AdminError, CommandChecker, sign_command
from magi_gateway.core.errors import CLOSE_ADMIN_DISCONNECT
from magi_gateway.redis.admin import publish_and_collect
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.server.admin import FANOUT_GRACE_MS
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from . import agents_for_tests
from ._delivery_helpers import assert_nothing_more
from ._support import APPID, GatewayHandle, judge, recv, send
from ._support import SECRET as FIXED

SECRET = "admin-secret-for-tests"
NOW = 1_800_000_000_000


def command(name: str = "broadcast", nonce: str = "n1", ts: int = NOW, **args: object) -> AdminCommand:
    return AdminCommand(name, ts, nonce, "reply", dict(args) or {"message": "hi"})  # type: ignore[arg-type]


# -- sans-I/O -----------------------------------------------------------------------------


def test_a_signed_command_is_accepted_once() -> None:
    checker = CommandChecker(SECRET)
    signed = sign_command(command(), SECRET)
    accepted = checker.check(signed, NOW + 1000)
    assert accepted == command()
    with pytest.raises(AdminError, match="replayed"):
        checker.check(signed, NOW + 1000)


@pytest.mark.parametrize(
    ("message", "now", "reason"),
    [
        (sign_command(command(), "other-secret"), NOW, "bad signature"),
        (sign_command(command(), SECRET).replace(b'"hi"', b'"ho"'), NOW, "bad signature"),
        (b"no separator", NOW, "bad signature"),
        (sign_command(command(), SECRET), NOW + MAX_AGE_MS + 1, "too old"),
        (sign_command(command(), SECRET), NOW - MAX_AGE_MS - 1, "too old"),
        (sign_command(command("shutdown"), SECRET), NOW, "unknown command"),
        (sign_command(command("broadcast", message=""), SECRET), NOW, "broadcast needs a message"),
        (sign_command(command("broadcast", message="x" * 5000), SECRET), NOW, "broadcast needs a message"),
        (sign_command(command("disconnect-app", x=1), SECRET), NOW, "needs an appid"),
        (sign_command(command("disconnect-all", appid=5), SECRET), NOW, "appid must be a string"),
    ],
)
def test_refused_commands_say_why(message: bytes, now: int, reason: str) -> None:
    with pytest.raises(AdminError, match=reason):
        CommandChecker(SECRET).check(message, now)


def test_malformed_body_with_a_valid_signature_is_refused() -> None:
    import hashlib
    import hmac

    body = b'{"command": "broadcast"}'
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
    with pytest.raises(AdminError, match="malformed"):
        CommandChecker(SECRET).check(signature + b"\n" + body, NOW)


def test_a_command_for_another_deployment_is_refused() -> None:
    ours = CommandChecker(SECRET, "prod:admin")
    theirs = AdminCommand("broadcast", NOW, "n1", "reply", {"message": "hi"}, "staging:admin")
    with pytest.raises(AdminError, match="another deployment"):
        ours.check(sign_command(theirs, SECRET), NOW)
    mine = AdminCommand("broadcast", NOW, "n2", "reply", {"message": "hi"}, "prod:admin")
    assert ours.check(sign_command(mine, SECRET), NOW) == mine


def test_a_command_name_that_is_not_a_string_is_malformed() -> None:
    import hashlib
    import hmac

    body = orjson.dumps({"command": ["broadcast"], "ts": NOW, "nonce": "n", "reply_to": "r"})
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
    with pytest.raises(AdminError, match="malformed"):
        CommandChecker(SECRET).check(signature + b"\n" + body, NOW)


def test_without_a_secret_every_command_is_refused() -> None:
    with pytest.raises(AdminError, match="disabled"):
        CommandChecker(None).check(sign_command(command(), SECRET), NOW)


def test_seen_nonces_are_bounded() -> None:
    checker = CommandChecker(SECRET)
    for i in range(5000):
        checker.check(sign_command(command(nonce=f"n{i}"), SECRET), NOW)
    assert len(checker._seen) == 4096
    # The oldest were evicted (they are long expired by then in real use).
    checker.check(sign_command(command(nonce="n0"), SECRET), NOW)


# -- two live gateways ----------------------------------------------------------------------


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_secret": SECRET})


async def test_commands_reach_every_instance(
    admin_settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_worker: Callable[..., Awaitable[Worker]],
) -> None:
    first = await start_gateway(admin_settings)
    second = await start_gateway(admin_settings)
    await start_worker([agents_for_tests.echo])
    async with (
        await first.connect("app-a") as a1,
        await second.connect("app-a") as a2,
        await second.connect("app-b") as b2,
    ):
        record = await judge(a1, ["echo"])
        session_id = record.messages[0]["session_id"]

        answers = await send_command(
            admin_settings, SECRET, "broadcast", {"message": "maintenance at 5"}, 1.0
        )
        assert sorted(a["instance"] for a in answers) == sorted(
            [first.gateway.instance_id, second.gateway.instance_id]
        )
        assert sum(a["connections"] for a in answers) == 3
        for ws in (a1, a2, b2):
            assert await recv(ws) == {"type": "broadcast", "message": "maintenance at 5"}

        # Only app-b on the second instance.
        answers = await send_command(
            admin_settings, SECRET, "broadcast", {"message": "b", "appid": "app-b"}, 1.0
        )
        assert {a["instance"]: a["connections"] for a in answers} == {
            first.gateway.instance_id: 0,
            second.gateway.instance_id: 1,
        }
        assert (await recv(b2))["message"] == "b"

        # A keep-alive session is still listed where its connection is.
        await send(a2, {"type": "resume", "session_id": session_id, "last_seq": 0})
        for _ in record.messages:
            await recv(a2)
        answers = await send_command(admin_settings, SECRET, "sessions", {}, 1.0)
        by_instance = {a["instance"]: a for a in answers}
        assert by_instance[first.gateway.instance_id]["connections"] == 1
        assert by_instance[second.gateway.instance_id]["connections"] == 2

        # disconnect-app closes app-a everywhere with 4002, and leaves app-b alone.
        answers = await send_command(admin_settings, SECRET, "disconnect-app", {"appid": "app-a"}, 1.0)
        assert sum(a["connections"] for a in answers) == 2
        for ws in (a1, a2):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CLOSE_ADMIN_DISCONNECT
        await send(b2, {"type": "ping"})
        assert (await recv(b2))["type"] == "pong"

        # A wrong secret reaches nobody: no answer, nothing closed.
        assert await send_command(admin_settings, "wrong", "disconnect-all", {}, 0.5) == []
        await send(b2, {"type": "ping"})
        assert (await recv(b2))["type"] == "pong"

        answers = await send_command(admin_settings, SECRET, "disconnect-all", {}, 1.0)
        assert sum(a["connections"] for a in answers) == 1
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(b2.recv(), 5)


def run_cli(args: list[str], settings: Settings, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "REDIS_URL": settings.redis_dsn,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        **env,
    }
    if "ADMIN_SECRET" not in env:
        full_env.pop("ADMIN_SECRET", None)
    return subprocess.run(
        [sys.executable, "-m", "magi_gateway", "admin", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_admin_command_line(
    admin_settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_worker: Callable[..., Awaitable[Worker]],
) -> None:
    gateway = await start_gateway(admin_settings)
    await start_worker([agents_for_tests.echo])
    async with await gateway.connect() as ws:
        done = await asyncio.to_thread(
            run_cli, ["broadcast", "hello all", "--json"], admin_settings, ADMIN_SECRET=SECRET
        )
        assert done.returncode == 0, done.stderr
        answers = orjson.loads(done.stdout)
        assert answers == [
            {"instance": gateway.gateway.instance_id, "command": "broadcast", "connections": 1}
        ]
        assert await recv(ws) == {"type": "broadcast", "message": "hello all"}

        agents = await asyncio.to_thread(run_cli, ["agents", "--json", "--secret", SECRET], admin_settings)
        assert agents.returncode == 0, agents.stderr
        assert orjson.loads(agents.stdout) == {"echo": {"workers": 1, "lag": 0, "pending": 0}}

        sessions = await asyncio.to_thread(run_cli, ["sessions", "--secret", SECRET], admin_settings)
        assert sessions.returncode == 0, sessions.stderr
        assert "on 1 instance(s)" in sessions.stdout

    missing = await asyncio.to_thread(run_cli, ["disconnect-all"], admin_settings)
    assert missing.returncode == 2
    assert "ADMIN_SECRET" in missing.stderr
    nobody = await asyncio.to_thread(
        run_cli, ["disconnect-all", "--secret", "wrong", "--wait", "0.3"], admin_settings
    )
    assert nobody.returncode == 1
    assert "no gateway instance answered" in nobody.stdout


async def test_magi_client_keeps_broadcasts_apart_from_replies(
    admin_settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
    start_worker: Callable[..., Awaitable[Worker]],
) -> None:
    gateway = await start_gateway(admin_settings)
    await start_worker([agents_for_tests.echo])
    async with MagiClient(f"ws://127.0.0.1:{gateway.port}/ws", appid=APPID, secret=FIXED) as client:
        answers = await send_command(admin_settings, SECRET, "broadcast", {"message": "first"}, 0.5)
        assert sum(a["connections"] for a in answers) == 1
        # A broadcast arriving while a reply is awaited is not taken for the reply.
        pinging = asyncio.create_task(client.ping())
        await send_command(admin_settings, SECRET, "broadcast", {"message": "second"}, 0.3)
        await pinging
        agents = await client.agents()
        assert agents[0]["agent_id"] == "echo"
        messages = [m async for m in client.judge("x", ["echo"])]
        assert messages[-1]["type"] == "agent_judgement_complete"
    assert list(client.broadcasts) == ["first", "second"]


async def test_a_replayed_command_is_refused_by_an_instance_started_since(
    admin_settings: Settings,
    start_gateway: Callable[[Settings], Awaitable[GatewayHandle]],
) -> None:
    """The nonces are recorded in Redis: a restarted instance does not forget them (#12 item 11)."""
    keys = Keys(admin_settings.redis_key_prefix)
    nonce = "captured-nonce"
    reply_to = keys.admin_reply_channel(nonce)
    signed = sign_command(
        AdminCommand("broadcast", now_ms(), nonce, reply_to, {"message": "once"}, keys.admin_channel), SECRET
    )
    redis = connect(admin_settings, client_name="test-admin")
    try:
        first = await start_gateway(admin_settings)
        async with await first.connect() as ws:
            answers = await publish_and_collect(redis, keys.admin_channel, signed, reply_to, 1.0)
            assert len(answers) == 1
            assert await recv(ws) == {"type": "broadcast", "message": "once"}
        # A fresh instance on the same Redis, after the command's fan-out, inside its 30 s.
        await asyncio.sleep((FANOUT_GRACE_MS + 500) / 1000)
        fresh = await start_gateway(admin_settings)
        async with await fresh.connect() as ws:
            assert await publish_and_collect(redis, keys.admin_channel, signed, reply_to, 1.0) == []
            await assert_nothing_more(ws)  # no broadcast queued before the pong
    finally:
        await redis.aclose()
