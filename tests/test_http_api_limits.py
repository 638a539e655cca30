"""The ``/v1`` HTTP API's edges against a live gateway: authentication, validation (the
WebSocket's codes), tenancy, stream bounds, keepalives and a client that stops reading."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets

from magi_gateway import Context, Judgement, agent
from magi_gateway.agents import demo_agents
from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.core.jwt_auth import mint
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._sse import Event, auth, collect, events
from ._support import APPID, SECRET, GatewayHandle, assert_clean_error, make_token, recv
from .test_http_api import DEMO, SSE, assert_events_are_the_log, body, gated_agent, read_until, stored_log

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


def limited(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update=changes)


@pytest.fixture
async def client(gateway: GatewayHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Magi-Appid": APPID, "X-Magi-Token": "0123456789"},
        {"Authorization": "Bearer not.a.jwt"},
        {"X-Magi-Appid": "", "X-Magi-Token": make_token()},
    ],
)
async def test_bad_credentials_are_401_on_every_route(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    sid = "0" * 32
    for method, path in [
        ("POST", "/v1/judgements"),
        ("GET", "/v1/agents"),
        ("GET", f"/v1/sessions/{sid}"),
        ("GET", f"/v1/sessions/{sid}/events"),
        ("POST", f"/v1/sessions/{sid}/cancel"),
        ("GET", "/v1/openapi.json"),
    ]:
        response = await client.request(method, path, headers=headers, json=body(DEMO))
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        assert_clean_error(response.json(), "auth_failed")


async def test_credentials_in_the_query_string_work(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/v1/agents?appid={APPID}&token={make_token()}")
    assert response.status_code == 200
    assert response.json()["type"] == "agents"


async def test_repeated_failures_are_throttled(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(limited(settings, max_auth_failures_per_min=3))
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        bad = {"X-Magi-Appid": APPID, "X-Magi-Token": "0123456789"}
        codes = [(await client.get("/v1/agents", headers=bad)).status_code for _ in range(3)]
        throttled = await client.get("/v1/agents", headers=auth())  # even with a good token now
    assert codes == [401, 401, 401]
    assert throttled.status_code == 429
    assert_clean_error(throttled.json(), "auth_throttled")


async def test_requests_are_rate_limited_per_client(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(limited(settings, max_messages_per_s=0.01, message_burst=2))
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        codes = [(await client.get("/v1/agents", headers=auth())).status_code for _ in range(3)]
        limited_response = await client.get("/v1/agents", headers=auth())
        other = await client.get("/v1/agents", headers=auth("other-app"))
    assert codes == [200, 200, 429]
    assert_clean_error(limited_response.json(), "rate_limited")
    assert other.status_code == 200


async def test_another_appids_session_is_404(client: httpx.AsyncClient, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    session_id = (await client.post("/v1/judgements", json=body(DEMO), headers=auth())).json()["session_id"]
    for method, path in [
        ("GET", f"/v1/sessions/{session_id}"),
        ("GET", f"/v1/sessions/{session_id}/events"),
        ("POST", f"/v1/sessions/{session_id}/cancel"),
        ("GET", "/v1/sessions/not-a-session-id"),
    ]:
        response = await client.request(method, path, headers=auth("other-app"))
        assert response.status_code == 404, (method, path)
        assert_clean_error(response.json(), "session_not_found")
    assert (await client.get(f"/v1/sessions/{session_id}", headers=auth())).status_code == 200


BAD_BODIES: list[bytes] = [
    b"{",
    b"[1, 2]",
    orjson.dumps({"data": {"user_input": "x"}}),
    orjson.dumps(body([])),
    orjson.dumps(body([f"a{i}" for i in range(17)])),
    orjson.dumps(body(["no spaces"])),
    orjson.dumps(body(["echo", "echo"])),
    orjson.dumps({"agent_ids": ["echo"], "data": {}}),
    orjson.dumps({"agent_ids": ["echo"], "data": {"user_input": 5}}),
    orjson.dumps(body(["echo"], "x" * (33 * 1024))),
    orjson.dumps(body(["echo"], request_id="r" * 129)),
    orjson.dumps(body(["echo"], padding="x" * (65 * 1024))),
]


@pytest.mark.parametrize("raw", BAD_BODIES, ids=range(len(BAD_BODIES)))
async def test_validation_errors_are_the_websockets(
    gateway: GatewayHandle, client: httpx.AsyncClient, raw: bytes
) -> None:
    ws = await gateway.connect()
    try:
        frame = raw if raw[:1] != b"{" or raw == b"{" else b'{"type":"agent_judgement",' + raw[1:]
        await ws.send(frame.decode())
        expected = await recv(ws)
    finally:
        await ws.close()
    for accept in ({}, SSE):
        response = await client.post("/v1/judgements", content=raw, headers={**accept, **auth()})
        answer = response.json()
        assert answer["code"] == expected["code"], (answer, expected)
        assert response.status_code == (413 if expected["code"] == "frame_too_large" else 400)
        assert_clean_error(answer, expected["code"])
        assert answer.get("request_id") == expected.get("request_id")


async def test_a_bad_cursor_is_400(client: httpx.AsyncClient, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    session_id = (await client.post("/v1/judgements", json=body(DEMO), headers=auth())).json()["session_id"]
    for query, headers in [("?last_seq=-1", {}), ("", {"Last-Event-ID": "x"}), ("?last_seq=1e3", {})]:
        response = await client.get(f"/v1/sessions/{session_id}/events{query}", headers={**headers, **auth()})
        assert response.status_code == 400
        assert_clean_error(response.json(), "invalid_field")


async def test_streams_are_bounded_per_instance(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    gateway = await start_gateway(limited(settings, sse_max_streams=1))
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        session_id = (await client.post("/v1/judgements", json=body(["gated"]), headers=auth())).json()[
            "session_id"
        ]
        path = f"/v1/sessions/{session_id}/events"
        async with client.stream("GET", path, headers=auth()) as first:
            # Kept referenced: a collected generator would close the response, and the stream.
            held = events(first)
            await read_until(held, lambda e: e.id == 1)
            second = await client.get(path, headers=auth())
            also = await client.post("/v1/judgements", json=body(["gated"]), headers={**SSE, **auth()})
        assert second.status_code == also.status_code == 503
        assert second.headers["retry-after"] == "1"
        assert_clean_error(second.json(), "too_many_streams")
        assert_clean_error(also.json(), "too_many_streams")
        gate.set()
        await wait_for(lambda: http_api(gateway).slots.open == 0)
        async with client.stream("GET", path, headers=auth()) as again:
            assert again.status_code == 200
            assert (await collect(again))[-1].event == "agent_judgement_complete"


def http_api(gateway: GatewayHandle) -> Any:
    assert gateway.app is not None
    return gateway.app.state.http_api


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a condition of the in-process gateway that no event announces."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_streams_count_as_connections_of_their_appid(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    gateway = await start_gateway(limited(settings, max_connections_per_app=1))
    assert gateway.gateway is not None
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    async with httpx.AsyncClient(base_url=gateway.http, timeout=20) as client:
        ws = await gateway.connect()
        accepted = await client.post("/v1/judgements", json=body(["gated"]), headers=auth())
        assert accepted.status_code == 202  # not a stream: not a connection
        path = f"/v1/sessions/{accepted.json()['session_id']}/events"
        refused = await client.get(path, headers=auth())
        assert refused.status_code == 429
        assert_clean_error(refused.json(), "too_many_connections")
        await ws.close()
        await wait_for(lambda: not gateway.gateway.at_capacity(APPID))  # type: ignore[union-attr]
        async with client.stream("GET", path, headers=auth()) as stream:
            got = events(stream)
            await read_until(got, lambda e: e.id == 1)
            async with websockets.connect(gateway.ws_url()) as other:
                assert_clean_error(await recv(other), "too_many_connections")
            gate.set()
            rest = await read_until(got, lambda e: False)
            assert rest[-1].event == "agent_judgement_complete"
        await wait_for(lambda: not gateway.gateway.at_capacity(APPID))  # type: ignore[union-attr]


async def test_idle_streams_get_keepalives(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    gateway = await start_gateway(limited(settings, sse_keepalive_s=0.1))
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    async with (
        httpx.AsyncClient(base_url=gateway.http, timeout=20) as client,
        client.stream("POST", "/v1/judgements", json=body(["gated"]), headers={**SSE, **auth()}) as response,
    ):
        stream = events(response)
        await read_until(stream, lambda e: b"before 2" in e.data)
        keepalives = 0
        async for event in stream:
            assert not event.data  # nothing else while the agent waits
            keepalives += event.comments.count("keepalive")
            if keepalives == 3:
                break
        gate.set()
        rest = await read_until(stream, lambda e: e.event == "agent_judgement_complete")
    assert rest[-1].event == "agent_judgement_complete"
    assert [e.id for e in rest] == list(range(rest[0].id, rest[0].id + len(rest)))  # type: ignore[arg-type]


CHUNK = "x" * 60_000


@agent("bulky")
async def bulky(user_input: str, ctx: Context) -> Judgement:
    """About 9 MB of thinking: more than every buffer between the gateway and a client holds."""
    for _ in range(150):
        await ctx.think(CHUNK)
    return Judgement("done", decision="approve")


def metric(response: httpx.Response, name: str) -> float:
    """A sample's value in a ``/metrics`` answer."""
    (line,) = [line for line in response.text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


def chunked_events(raw: bytes) -> list[Event]:
    """The events of the complete chunks of a chunked HTTP body (a cut-off chunk is dropped)."""
    got: list[Event] = []
    at = 0
    while True:
        end = raw.find(b"\r\n", at)
        if end < 0:
            break
        size = int(raw[at:end], 16)
        if size == 0 or end + 2 + size + 2 > len(raw):
            break
        for block in raw[end + 2 : end + 2 + size].split(b"\n\n"):
            if block.startswith(b"id: "):
                head, kind, data = block.split(b"\n")
                got.append(Event(int(head[4:]), kind[7:].decode(), data[6:]))
        at = end + 2 + size + 2
    return got


async def test_a_reader_that_stops_is_dropped_and_resumes_with_nothing_lost(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    gateway = await start_gateway(limited(settings, sse_write_timeout_s=0.5))
    await start_worker([bulky])
    async with httpx.AsyncClient(base_url=gateway.http, timeout=30) as client:
        async with client.stream(
            "POST", "/v1/judgements", json=body(["bulky"]), headers={**SSE, **auth()}
        ) as r:
            whole = await collect(r)
        session_id = whole[0].message["session_id"]
        # A client with a small receive window that reads the head of the stream, then stops.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        request = f"GET /v1/sessions/{session_id}/events HTTP/1.1\r\nHost: t\r\nX-Magi-Appid: {APPID}\r\n"
        writer.write(f"{request}X-Magi-Token: {make_token()}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await wait_for(lambda: http_api(gateway).slots.open == 0, timeout=20)  # dropped
        assert metric(await client.get("/metrics"), "magi_sse_streams_dropped_total") >= 1
        raw = b""
        try:
            while chunk := await reader.read(1 << 16):
                raw += chunk
        except ConnectionError:
            pass
        writer.close()
        assert not raw.endswith(b"0\r\n\r\n")  # the stream was cut, not finished
        got = chunked_events(raw)
        assert len(got) < len(whole)
        last = got[-1].id if got else 0
        async with client.stream(
            "GET", f"/v1/sessions/{session_id}/events", headers={"Last-Event-ID": str(last), **auth()}
        ) as r:
            rest = await collect(r)
    assert_events_are_the_log(got + rest, await stored_log(settings, session_id))


async def test_a_stream_ends_when_its_jwt_expires(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    expires = int(time.time()) + 2
    token = mint(APPID, SECRET, now=expires - 60, ttl_s=60)
    async with (
        httpx.AsyncClient(base_url=gateway.http, timeout=20) as client,
        client.stream(
            "POST",
            "/v1/judgements",
            json=body(["gated"]),
            headers={**SSE, "Authorization": f"Bearer {token}"},
        ) as response,
    ):
        got = await collect(response)
    gate.set()
    assert time.time() >= expires
    assert got[0].event == "agent_judgement_accepted"
    assert got[-1].event == "error"
    assert_clean_error(got[-1].message, "token_expired")
    assert got[-1].message["session_id"] == got[0].message["session_id"]


async def test_streams_end_when_the_server_shuts_down(settings: Settings, start_worker: StartWorker) -> None:
    gate = asyncio.Event()
    await start_worker([gated_agent("gated", gate)])
    app = create_app(settings)  # keepalives every 15 s: the end must not wait for one
    server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", 0, "warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with (
            httpx.AsyncClient(timeout=20) as client,
            client.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/judgements",
                json=body(["gated"]),
                headers={**SSE, **auth()},
            ) as response,
        ):
            stream = events(response)
            head = await read_until(stream, lambda e: b"before 2" in e.data)
            started = time.monotonic()
            server.should_exit = True
            assert await read_until(stream, lambda e: False) == []  # ended cleanly, nothing more
        await asyncio.wait_for(serving, 5)
        assert time.monotonic() - started < 5
    finally:
        server.should_exit = True
        gate.set()
        await asyncio.gather(serving, return_exceptions=True)
    assert head[0].event == "agent_judgement_accepted"
