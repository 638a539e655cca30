"""The ``limit`` baseline: the least a relay must do, to compare the gateway's CPU with.

``python -m magi_gateway.bench.limit --port P --redis-url URL [--prefix P]``

A raw ``websockets`` asyncio server and redis-py (hiredis) on uvloop. It accepts any
client, greets it like the gateway does, and on ``agent_judgement`` creates the
session exactly as the gateway does (``Store.create_session`` with itself as the
owner instance, then ``Store.enqueue_request``), so the same worker serves it and
the same Lua script stores and publishes every message. One subscription to its
own notification channel forwards each notified frame, byte for byte, to the
socket that asked. No framework, no delivery cursor, no validation, no limits.
It is the baseline, not a product: do not expose it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal

import orjson
import websockets
from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection

# Not ``websockets.ConnectionClosed``: that name is resolved lazily on every access.
from websockets.exceptions import ConnectionClosed

from magi_gateway._util import now_ms
from magi_gateway.core.ids import AgentId, AppId, InstanceId
from magi_gateway.core.session import new_session_id
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store

__all__ = ["LimitRelay", "main"]

_COMPLETE_PREFIX = b'{"type":"agent_judgement_complete"'
_TIMEOUT_MS = 60_000
_SUBSCRIBE_TIMEOUT_S = 10.0
_POOL_CONNECTIONS = 100_000


class LimitRelay:
    """The minimal relay: sockets by session id, one notification subscription."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.store = Store(redis, keys)
        self.instance_id = InstanceId(f"limit-{secrets.token_hex(4)}")
        self.sockets: dict[bytes, ServerConnection] = {}

    async def forward(self, subscribed: asyncio.Event) -> None:
        """Send every notified frame to the socket whose session it belongs to."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.keys.gateway_channel(self.instance_id))
        subscribed.set()
        async for message in pubsub.listen():
            session_id, _seq, frame = message["data"].split(b"\n", 2)
            ws = self.sockets.get(session_id)
            if ws is None:
                continue
            if frame.startswith(_COMPLETE_PREFIX):
                del self.sockets[session_id]
            try:
                await ws.send(frame.decode())
            except ConnectionClosed:
                continue

    async def handle(self, ws: ServerConnection) -> None:
        """Greet the client, then start a session for each ``agent_judgement``."""
        await ws.send(f'{{"type":"connection_established","connection_id":"{secrets.token_hex(8)}"}}')
        appid = AppId("bench")
        async for raw in ws:
            message = orjson.loads(raw)
            if message.get("type") != "agent_judgement":
                continue
            session_id = new_session_id()
            agent_ids = [AgentId(a) for a in message["agent_ids"]]
            deadline_ms = now_ms() + _TIMEOUT_MS
            self.sockets[session_id.encode()] = ws
            await self.store.create_session(
                session_id, appid, self.instance_id, agent_ids, deadline_ms, message.get("request_id")
            )
            for agent_id in agent_ids:
                await self.store.enqueue_request(
                    session_id, agent_id, message["data"]["user_input"], deadline_ms, appid
                )


async def serve(port: int, redis_url: str, prefix: str) -> None:
    """Run the baseline on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    # redis-py's default pool (100) raises once more commands are in flight: the baseline
    # is not to fail where a larger pool would do.
    redis = Redis.from_url(redis_url, max_connections=_POOL_CONNECTIONS)
    relay = LimitRelay(redis, Keys(prefix))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    subscribed = asyncio.Event()
    forwarder = asyncio.create_task(relay.forward(subscribed), name="limit-forward")
    try:
        await asyncio.wait_for(subscribed.wait(), _SUBSCRIBE_TIMEOUT_S)
        async with websockets.serve(relay.handle, "127.0.0.1", port, max_size=None):
            await stop.wait()
    finally:
        forwarder.cancel()
        await asyncio.gather(forwarder, return_exceptions=True)
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default=Keys().prefix)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port, args.redis_url, args.prefix))


if __name__ == "__main__":
    main()
