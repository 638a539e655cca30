"""Admin commands carried to every gateway instance (sans-I/O: signing and checking).

``magi-gateway admin`` publishes a command on the deployment's admin channel; every
gateway instance subscribed to it acts on its own connections and answers on the
command's reply channel. Anyone who can publish to Redis could forge a command, so
each one is signed with ``ADMIN_SECRET``::

    HEX(HMAC-SHA256(ADMIN_SECRET, BODY)) "\\n" BODY

where ``BODY`` is the JSON object ``{"command", "args", "ts", "nonce", "reply_to",
"channel"}``; ``channel`` is the admin channel it was published on, so a command cannot
be replayed into another deployment sharing the Redis and the secret.
A gateway without ``ADMIN_SECRET`` ignores every command. A command is refused when
its signature is wrong, when ``ts`` (ms) is more than ``MAX_AGE_MS`` from the
gateway's clock, or when its nonce was seen already (a replay); seen nonces are
kept in a bounded table (overflow policy: evict the oldest, which is older than
``MAX_AGE_MS`` long before the table fills at any sane command rate). That table
forgets on restart: the gateway also records each nonce in Redis
(``redis.admin.AdminNonces``) and refuses one first seen, by any instance, longer ago
than a publication takes to reach them all.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

__all__ = [
    "COMMANDS",
    "MAX_AGE_MS",
    "MAX_BROADCAST_CHARS",
    "AdminCommand",
    "AdminError",
    "CommandChecker",
    "CommandName",
    "sign_command",
]

CommandName = Literal["broadcast", "disconnect-all", "disconnect-app", "sessions"]
COMMANDS: frozenset[str] = frozenset({"broadcast", "disconnect-all", "disconnect-app", "sessions"})

#: Commands older or newer than this (by the gateway's clock) are refused.
MAX_AGE_MS = 30_000
_SEEN_NONCES = 4096


class AdminError(ValueError):
    """A command that must not be executed; the text says why (for the gateway's log)."""


@dataclass(frozen=True, slots=True)
class AdminCommand:
    """One admin command, as published."""

    command: CommandName
    ts: int
    nonce: str
    reply_to: str
    args: dict[str, Any] = field(default_factory=dict)
    #: The admin channel (hence the deployment) the command is meant for.
    channel: str = ""

    def body(self) -> bytes:
        """The signed JSON body."""
        return orjson.dumps(
            {
                "command": self.command,
                "args": self.args,
                "ts": self.ts,
                "nonce": self.nonce,
                "reply_to": self.reply_to,
                "channel": self.channel,
            }
        )


def _signature(secret: str, body: bytes) -> bytes:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()


def sign_command(command: AdminCommand, secret: str) -> bytes:
    """The message to publish for ``command``."""
    body = command.body()
    return _signature(secret, body) + b"\n" + body


class CommandChecker:
    """Verifies published commands for one gateway instance."""

    def __init__(self, secret: str | None, channel: str = "") -> None:
        self.secret = secret
        self.channel = channel
        self._seen: OrderedDict[str, None] = OrderedDict()

    def check(self, message: bytes, now_ms: int) -> AdminCommand:
        """The command in ``message``, or ``AdminError`` saying why it is refused."""
        if not self.secret:
            raise AdminError("admin commands are disabled here (no ADMIN_SECRET)")
        signature, sep, body = message.partition(b"\n")
        if not sep or not hmac.compare_digest(signature, _signature(self.secret, body)):
            raise AdminError("bad signature")
        try:
            raw = orjson.loads(body)
            name = raw["command"]
            if not isinstance(name, str):
                raise TypeError("command is not a string")
            command = AdminCommand(
                command=name,  # type: ignore[arg-type]  # checked against COMMANDS below
                ts=int(raw["ts"]),
                nonce=str(raw["nonce"]),
                reply_to=str(raw["reply_to"]),
                args=dict(raw.get("args") or {}),
                channel=str(raw.get("channel", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AdminError(f"malformed command: {exc}") from exc
        if command.command not in COMMANDS:
            raise AdminError(f"unknown command {command.command!r}")
        if command.channel != self.channel:
            raise AdminError("command meant for another deployment")
        _check_args(command)
        if abs(now_ms - command.ts) > MAX_AGE_MS:
            raise AdminError("command too old (or clocks too far apart)")
        if command.nonce in self._seen:
            raise AdminError("replayed command")
        self._seen[command.nonce] = None
        while len(self._seen) > _SEEN_NONCES:
            self._seen.popitem(last=False)
        return command


#: Longest broadcast text, in characters.
MAX_BROADCAST_CHARS = 4096


def _check_args(command: AdminCommand) -> None:
    args = command.args
    if command.command == "broadcast":
        message = args.get("message")
        if not isinstance(message, str) or not message or len(message) > MAX_BROADCAST_CHARS:
            raise AdminError(f"broadcast needs a message of 1-{MAX_BROADCAST_CHARS} characters")
    if command.command == "disconnect-app" and not isinstance(args.get("appid"), str):
        raise AdminError("disconnect-app needs an appid")
    appid = args.get("appid")
    if appid is not None and not isinstance(appid, str):
        raise AdminError("appid must be a string")
