"""Both ``/ws`` drivers against a live gateway and Redis: the fast one ``magi-gateway serve``
runs (``WS_IMPL=fast``, ``server.ws_protocol``) and the ASGI one (``uvicorn main:app``-style,
``server.websocket``) behave the same; the fast one's own framing holds on raw sockets.

The rest of the suite runs on the fast driver (the fixtures use ``serve``'s configuration).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest
import uvicorn
import websockets
from websockets.exceptions import InvalidStatus

from magi_gateway.agents import demo_agents
from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import GatewayHandle, assert_well_formed, judge, make_token, recv, send

DEMO = ["melchior", "balthasar", "casper"]
DRIVERS = ["fast", "websockets-sansio"]

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_judgement_resume_and_pong_alike(
    driver: str, settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"ws_impl": driver}))
    await start_worker(demo_agents(delay_s=0.01))
    async with await gateway.connect() as ws:
        record = await judge(ws, DEMO)
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
    assert_well_formed(record, DEMO)
    async with await gateway.connect() as ws:
        await send(ws, {"type": "resume", "session_id": record.messages[0]["session_id"], "last_seq": 3})
        replay = [await recv(ws) for _ in range(len(record.messages) - 3)]
    assert replay == record.messages[3:]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_refusals_alike(driver: str, settings: Settings, start_gateway: StartGateway) -> None:
    listed = settings.model_copy(update={"ws_impl": driver, "cors_origins": "http://ok.example"})
    gateway = await start_gateway(listed)
    async with websockets.connect(gateway.ws_url(token="0000000000")) as ws:
        assert orjson.loads(await ws.recv()) == {"error": "Authentication failed", "code": "auth_failed"}
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4001
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(gateway.ws_url(), origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    too_big = "x" * (4 * settings.max_frame_bytes + 1)
    async with await gateway.connect() as ws:
        await ws.send(too_big)
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1009


async def test_http_routes_share_the_port_with_the_fast_driver(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        assert (await http.get("/")).status_code == 200
        assert "magi_connections" in (await http.get("/metrics")).text
        assert (await http.post("/v1/token", json={"appid": "app"})).status_code == 200


# -- the fast driver's framing on raw sockets -------------------------------------------------


class RawClient:
    """A WebSocket client written against RFC 6455 directly, to send what libraries refuse to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, version: str = "13") -> tuple[RawClient, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return cls(reader, writer), head

    def send(self, payload: bytes, opcode: int = 0x1, *, fin: bool = True, mask: bool = True) -> None:
        first = (0x80 if fin else 0) | opcode
        key = os.urandom(4)
        length = len(payload)
        head = bytes((first, (0x80 if mask else 0) | length)) if length < 126 else b""
        assert head, "short frames only"
        body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
        self.writer.write(head + (key if mask else b"") + body)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 10)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert not second & 0x80, "server frames are unmasked"
        return first & 0x0F, await self.reader.readexactly(length)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def ws_path(appid: str = "app") -> str:
    return f"/ws?appid={appid}&token={make_token(appid)}"


async def test_fragments_pings_and_close_on_a_raw_socket(gateway: GatewayHandle) -> None:
    client, head = await RawClient.open(gateway.port, ws_path())
    assert head.startswith(b"HTTP/1.1 101")
    opcode, hello = await client.frame()
    assert (opcode, orjson.loads(hello)["type"]) == (0x1, "connection_established")
    client.send(b'{"type":', fin=False)  # a fragmented ping message, a control ping between
    client.send(b"are you there", 0x9)
    client.send(b'"ping"}', 0x0)
    assert await client.frame() == (0xA, b"are you there")
    assert await client.frame() == (0x1, b'{"type":"pong"}')
    client.send(struct.pack("!H", 1000) + b"bye", 0x8)
    assert await client.frame() == (0x8, struct.pack("!H", 1000))  # the code is echoed
    assert await client.closed()
    await client.close()


@pytest.mark.parametrize(
    ("payload", "opcode", "mask", "code", "reason"),
    [
        (b'{"type":"ping"}', 0x1, False, 1002, b"Client frames must be masked"),
        (b"\xff\xfe", 0x1, True, 1007, b"Text message is not UTF-8"),
        (b"x", 0x3, True, 1002, b"Unknown opcode"),
    ],
)
async def test_framing_violations_close_with_their_code(
    gateway: GatewayHandle, payload: bytes, opcode: int, mask: bool, code: int, reason: bytes
) -> None:
    client, _ = await RawClient.open(gateway.port, ws_path())
    await client.frame()  # connection_established
    client.send(payload, opcode, mask=mask)
    assert await client.frame() == (0x8, struct.pack("!H", code) + reason)
    client.send(struct.pack("!H", code), 0x8)  # the client answers the close
    assert await client.closed()
    await client.close()
    async with await gateway.connect() as ws:  # and the gateway serves on
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_other_paths_and_versions_are_refused_over_http(gateway: GatewayHandle) -> None:
    client, head = await RawClient.open(gateway.port, "/elsewhere")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    # The same headers as every other answer of the server (uvicorn's server and date).
    assert b"\r\nserver: uvicorn\r\n" in head
    assert b"\r\ndate: " in head
    assert await client.reader.read() == b"Not Found"  # then the connection closes
    await client.close()
    client, head = await RawClient.open(gateway.port, ws_path(), version="8")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nserver: uvicorn\r\n" in head
    await client.close()


async def test_a_peer_that_never_answers_pings_is_dropped(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn_config(app, settings, "127.0.0.1", 0, "warning")
    config.ws_ping_interval, config.ws_ping_timeout = 0.2, 0.2
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        client, _ = await RawClient.open(port, ws_path())
        await client.frame()  # connection_established
        assert (await client.frame())[0] == 0x9  # a ping, never answered
        assert await client.closed()  # dropped within the timeout
        await client.close()
        answering, _ = await RawClient.open(port, ws_path())
        await answering.frame()
        for _ in range(3):  # one that answers stays
            opcode, payload = await answering.frame()
            assert opcode == 0x9
            answering.send(payload, 0xA)
        await answering.close()
    finally:
        server.should_exit = True
        await serving
