"""The ``limit`` baseline gateway: the least a WebSocket + Redis relay must do.

``python -m magi_gateway.bench.limit --port P --redis-url URL [--prefix P]``

It shares no code with the product (import-linter checks it): a picows WebSocket server
on uvloop and the baseline's own RESP connections (``limit_resp``, hiredis). It accepts
any client on any path (no authentication), greets it like the gateway does, and on each
``agent_judgement`` text frame names a session, answers ``agent_judgement_accepted`` and
RPUSHes the session id on a list that the baseline worker (``limit_worker``) pops. One
subscription to its own channel receives the worker's frames (``session_id\\n`` + frame);
each is written to the socket that asked, bytes unchanged. No session state in Redis, no
delivery cursor, no validation, no limits, no fragmented frames: it is the baseline, not
a product, so do not expose it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import secrets
import signal
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from magi_gateway.bench.limit_keys import frames_channel, redis_address, requests_key
from magi_gateway.bench.limit_resp import RespConnection

__all__ = ["LimitGateway", "main"]

_COMPLETE_PREFIX = b'{"type":"agent_judgement_complete"'
_MAX_FRAME = 16 * 1024 * 1024


class LimitGateway:
    """Sockets by session id; requests out on a list, frames in from one subscription."""

    def __init__(self, redis: RespConnection, prefix: str) -> None:
        self.redis = redis
        self.gateway_id = secrets.token_hex(4).encode()
        self.channel = frames_channel(prefix, self.gateway_id)
        self.requests = requests_key(prefix)
        self.sockets: dict[bytes, WSTransport] = {}
        self.counter = itertools.count(1)

    def request(self, transport: WSTransport, payload: bytes) -> None:
        """An ``agent_judgement``: accept it and hand its session id to the workers."""
        message = orjson.loads(payload)
        if message.get("type") != "agent_judgement":
            return
        session_id = b"%s.%d" % (self.gateway_id, next(self.counter))
        self.sockets[session_id] = transport
        accepted = {
            "type": "agent_judgement_accepted",
            "session_id": session_id.decode(),
            "seq": 1,
            "agent_ids": message.get("agent_ids"),
            "request_id": message.get("request_id"),
        }
        transport.send(WSMsgType.TEXT, orjson.dumps(accepted))
        self.redis.send(b"RPUSH", self.requests, session_id)

    def forward(self, _channel: bytes, data: bytes) -> None:
        """One published ``session_id\\n`` + frame: the frame goes to its socket as it is."""
        cut = data.index(b"\n")
        session_id = data[:cut]
        if data.startswith(_COMPLETE_PREFIX, cut + 1):
            transport = self.sockets.pop(session_id, None)
        else:
            transport = self.sockets.get(session_id)
        if transport is not None and not transport.is_disconnected:
            transport.send(WSMsgType.TEXT, memoryview(data)[cut + 1 :])


class _Client(WSListener):
    """One WebSocket connection."""

    def __init__(self, gateway: LimitGateway) -> None:
        self.gateway = gateway

    def on_ws_connected(self, transport: WSTransport) -> None:
        hello = b'{"type":"connection_established","connection_id":"%s"}' % secrets.token_hex(8).encode()
        transport.send(WSMsgType.TEXT, hello)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.gateway.request(transport, frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def serve(port: int, redis_url: str, prefix: str) -> None:
    """Run the baseline gateway on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    host, redis_port = redis_address(redis_url)
    commands = await RespConnection.open(host, redis_port)
    subscription = await RespConnection.open(host, redis_port)
    gateway = LimitGateway(commands, prefix)
    await subscription.subscribe(gateway.channel, gateway.forward)

    def listener(_request: WSUpgradeRequest) -> _Client:
        return _Client(gateway)

    server = await ws_create_server(listener, "127.0.0.1", port, max_frame_size=_MAX_FRAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        ends = [stopped, commands.closed, subscription.closed]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        for lost in ends[1:]:
            if lost.done():
                lost.result()  # Redis went away: fail
    finally:
        stopped.cancel()
        server.close()
        commands.close()
        subscription.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default="bench")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port, args.redis_url, args.prefix))


if __name__ == "__main__":
    main()
