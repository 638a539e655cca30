"""``magi-gateway admin …``: commands to every gateway instance, and Redis-side reports.

``broadcast``, ``disconnect-all``, ``disconnect-app`` and ``sessions`` are signed with
``ADMIN_SECRET`` and published on the admin channel (see ``admin.py``); every
instance acts and answers on a reply channel, and the command prints the answers
received within ``--wait`` seconds (instances are not registered anywhere, so it
cannot know how many to expect). ``agents`` reads the workers' registry and the
request streams straight from Redis.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from magi_gateway._util import now_ms
from magi_gateway.core.admin import MAX_BROADCAST_CHARS, AdminCommand, CommandName, sign_command
from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.redis.admin import publish_and_collect
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings

__all__ = ["app", "send_command"]

app = typer.Typer(
    help="Act on every gateway instance through Redis (needs ADMIN_SECRET).", no_args_is_help=True
)
console = Console()

T = TypeVar("T")

_SecretOption = Annotated[str | None, typer.Option(help="Admin secret [env ADMIN_SECRET]")]
_WaitOption = Annotated[float, typer.Option(help="Seconds to collect the instances' answers")]
_JsonOption = Annotated[bool, typer.Option("--json", help="Print the answers as JSON")]


async def send_command(
    settings: Settings, secret: str, command: CommandName, args: dict[str, Any], wait_s: float
) -> list[dict[str, Any]]:
    """Publish a signed command; return the instances' answers received within ``wait_s``."""
    redis = connect(settings, client_name="magi-admin")
    keys = Keys(settings.redis_key_prefix)
    nonce = secrets.token_hex(12)
    reply_to = keys.admin_reply_channel(nonce)
    signed = sign_command(AdminCommand(command, now_ms(), nonce, reply_to, args, keys.admin_channel), secret)
    try:
        replies = await publish_and_collect(redis, keys.admin_channel, signed, reply_to, wait_s)
    finally:
        await redis.aclose()
    answers: list[dict[str, Any]] = []
    for reply in replies:
        try:
            answers.append(orjson.loads(reply))
        except orjson.JSONDecodeError:
            continue  # not an instance's answer
    return answers


def _secret(given: str | None, settings: Settings) -> str:
    secret = given or settings.admin_secret
    if not secret:
        raise typer.BadParameter("give --secret or set ADMIN_SECRET (the gateways' admin secret)")
    return secret


def _redis_call(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; Redis being unreachable ends the command with a message (exit 1)."""
    try:
        return asyncio.run(work)
    except BackendUnavailable as exc:
        console.print(f"[red]Redis unavailable: {exc.__cause__}[/red]")
        raise typer.Exit(1) from exc


async def _from_store(settings: Settings, read: Callable[[Store], Awaitable[T]]) -> T:
    """``read`` on a Store of a connection of its own."""
    redis = connect(settings, client_name="magi-admin")
    try:
        return await read(Store(redis, Keys(settings.redis_key_prefix)))
    finally:
        await redis.aclose()


def _run(command: CommandName, args: dict[str, Any], secret: str | None, wait: float) -> list[dict[str, Any]]:
    settings = Settings()
    answers = _redis_call(send_command(settings, _secret(secret, settings), command, args, wait))
    if not answers:
        console.print("[yellow]no gateway instance answered (none running, or ADMIN_SECRET differs)[/yellow]")
        raise typer.Exit(1)
    return answers


def _report(answers: list[dict[str, Any]], as_json: bool, verb: str) -> None:
    if as_json:
        console.print_json(orjson.dumps(answers).decode())
        return
    table = Table("instance", verb)
    for answer in sorted(answers, key=lambda a: a["instance"]):
        table.add_row(answer["instance"], str(answer["connections"]))
    console.print(table)
    total = sum(a["connections"] for a in answers)
    console.print(f"{total} connection(s) on {len(answers)} instance(s)")


@app.command()
def broadcast(
    message: Annotated[str, typer.Argument(help="Text sent to clients as {type: broadcast, message}")],
    appid: Annotated[str | None, typer.Option(help="Only this appid's connections")] = None,
    secret: _SecretOption = None,
    wait: _WaitOption = 1.0,
    as_json: _JsonOption = False,
) -> None:
    """Send a message to every connected client (or one appid's)."""
    if not message or len(message) > MAX_BROADCAST_CHARS:
        raise typer.BadParameter(f"the message must have 1-{MAX_BROADCAST_CHARS} characters")
    args: dict[str, Any] = {"message": message}
    if appid is not None:
        args["appid"] = appid
    _report(_run("broadcast", args, secret, wait), as_json, "clients reached")


@app.command("disconnect-all")
def disconnect_all(
    secret: _SecretOption = None, wait: _WaitOption = 1.0, as_json: _JsonOption = False
) -> None:
    """Close every client connection (code 4002, after what is queued); sessions run on."""
    _report(_run("disconnect-all", {}, secret, wait), as_json, "disconnected")


@app.command("disconnect-app")
def disconnect_app(
    appid: Annotated[str, typer.Argument(help="Application id")],
    secret: _SecretOption = None,
    wait: _WaitOption = 1.0,
    as_json: _JsonOption = False,
) -> None:
    """Close one appid's connections (code 4002); to keep it out, remove its secret first."""
    _report(_run("disconnect-app", {"appid": appid}, secret, wait), as_json, "disconnected")


@app.command()
def sessions(secret: _SecretOption = None, wait: _WaitOption = 1.0, as_json: _JsonOption = False) -> None:
    """Sessions being delivered by each instance, and how many run across the deployment."""
    answers = _run("sessions", {}, secret, wait)
    running = _redis_call(_from_store(Settings(), lambda store: store.deadlines.running()))
    if as_json:
        console.print_json(orjson.dumps({"running": running, "instances": answers}).decode())
        return
    table = Table("instance", "session", "appid", "connection", "last seq")
    for answer in sorted(answers, key=lambda a: a["instance"]):
        for item in answer["sessions"]:
            row = (item["session_id"], item["appid"], item["connection_id"], str(item["last_seq"]))
            table.add_row(answer["instance"], *row)
    console.print(table)
    attached = sum(len(a["sessions"]) for a in answers)
    connections = sum(a["connections"] for a in answers)
    console.print(
        f"{running} session(s) running; {attached} attached to {connections} connection(s) "
        f"on {len(answers)} instance(s)"
    )


@app.command()
def agents(secret: _SecretOption = None, as_json: _JsonOption = False) -> None:
    """Agents with live workers, and their queues (read from Redis)."""
    settings = Settings()
    _secret(secret, settings)  # the same gate as the other commands
    stats = _redis_call(_from_store(settings, lambda store: store.liveness.agent_stats()))
    found = {a: {"workers": s.workers, "lag": s.lag, "pending": s.pending} for a, s in stats.items()}
    if as_json:
        console.print_json(orjson.dumps(found).decode())
        return
    table = Table("agent", "workers", "queued (not read)", "running (read, not done)")
    for agent_id, stat in found.items():
        table.add_row(agent_id, str(stat["workers"]), str(stat["lag"]), str(stat["pending"]))
    console.print(table)
