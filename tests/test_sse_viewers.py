"""``/v1`` event streams are viewers of their session (issue #13): they see what the
WebSocket viewers see, byte for byte, count against ``MAX_VIEWERS_PER_SESSION`` (429
``too_many_viewers`` over it), give their place back when they end, and are not counted
when they replay a completed session. Real uvicorn gateways, real workers, a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
from redis.asyncio import Redis

from magi_gateway import Context, Judgement, agent
from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.core.ids import InstanceId, SessionId
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import Gated, assert_nothing_more, eventually
from ._sse import Event, auth, events
from ._support import APPID, GatewayHandle, assert_clean_error, judgement_message, make_token, recv, send

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix), retention_s=settings.session_retention_s)


def instance(handle: GatewayHandle) -> InstanceId:
    assert handle.gateway is not None
    return handle.gateway.instance_id


@contextlib.asynccontextmanager
async def viewer(handle: GatewayHandle) -> AsyncIterator[Any]:
    """An authenticated WebSocket connection."""
    async with websockets.connect(handle.ws_url()) as ws:
        assert orjson.loads(await ws.recv())["type"] == "connection_established"
        yield ws


def resume(session_id: str, last_seq: int = 0) -> dict[str, Any]:
    return {"type": "resume", "session_id": session_id, "last_seq": last_seq}


async def frames(ws: Any, count: int) -> list[bytes]:
    """The next ``count`` frames as the wire carried them, none an error."""
    got = [(await ws.recv()).encode() for _ in range(count)]
    assert all(b'"error"' not in frame for frame in got), got
    return got


async def frames_until_complete(ws: Any) -> list[bytes]:
    """Raw frames up to and including ``agent_judgement_complete``."""
    got: list[bytes] = []
    while not got or orjson.loads(got[-1])["type"] != "agent_judgement_complete":
        got += await frames(ws, 1)
    return got


async def data(stream: AsyncIterator[Event], count: int | None = None) -> list[Event]:
    """The next ``count`` events with data (all of them to the end, without ``count``)."""
    got: list[Event] = []
    async for event in stream:
        if event.data:
            got.append(event)
            if count is not None and len(got) == count:
                break
    return got


async def logged_frames(store: Store, session_id: str) -> list[bytes]:
    return [frame for _seq, _kind, frame in await store.read_log(SessionId(session_id), 1)]


async def stream_entries(store: Store, session_id: str) -> list[tuple[str, str]]:
    """The session's viewers that are event streams (entries not notified)."""
    listed = await store.viewers.listed(SessionId(session_id))
    return [(i, c) for i, c, notified in listed if not notified]


async def open_session(ws: Any, gated: Gated) -> tuple[str, list[bytes]]:
    """Open a judgement of ``gated`` on ``ws``: its id and what came before the gate."""
    await send(ws, judgement_message([gated.name]))
    head = await frames(ws, 1 + gated.before)
    return orjson.loads(head[0])["session_id"], head


def events_url(handle: GatewayHandle, session_id: str) -> str:
    return f"{handle.http}/v1/sessions/{session_id}/events"


async def test_ws_viewers_on_two_instances_and_an_sse_viewer_get_the_same_bytes(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=3, after=40)
    await start_worker([gated.agent])
    first, second = await start_gateway(settings), await start_gateway(settings)
    async with (
        viewer(first) as opener,
        viewer(second) as follower,
        httpx.AsyncClient(timeout=20) as client,
    ):
        session_id, by_opener = await open_session(opener, gated)
        await send(follower, resume(session_id))
        by_follower = await frames(follower, len(by_opener))
        async with client.stream("GET", events_url(first, session_id), headers=auth()) as response:
            assert response.status_code == 200
            stream = events(response)
            by_stream = await data(stream, len(by_opener))
            # Three viewers, the stream among them, in a form the append scripts skip.
            assert len(await store.viewers.entries(SessionId(session_id))) == 3
            assert [i for i, _ in await stream_entries(store, session_id)] == [instance(first)]
            gated.gate.set()  # the rest is live, for all three
            by_stream += await data(stream)
        by_opener += await frames_until_complete(opener)
        by_follower += await frames_until_complete(follower)
        await assert_nothing_more(opener)
        await assert_nothing_more(follower)
    log = await logged_frames(store, session_id)
    assert len(log) == 1 + 43 + 1 + 1
    assert by_opener == by_follower == [e.data for e in by_stream] == log
    assert [e.id for e in by_stream] == list(range(1, len(log) + 1))  # no gap, no repeat
    assert [e.event for e in by_stream] == [orjson.loads(f)["type"] for f in log]
    # It left at its end.
    await eventually(lambda: _no_streams(store, session_id), what="the stream to leave")


async def _no_streams(store: Store, session_id: str) -> bool:
    return not await stream_entries(store, session_id)


async def test_sse_streams_count_toward_the_viewer_bound(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    limited = settings.model_copy(update={"max_viewers_per_session": 2})
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    first, second = await start_gateway(limited), await start_gateway(limited)
    async with viewer(first) as opener, viewer(second) as refused, httpx.AsyncClient(timeout=20) as client:
        session_id, head = await open_session(opener, gated)
        async with client.stream("GET", events_url(second, session_id), headers=auth()) as response:
            assert response.status_code == 200
            stream = events(response)
            assert [e.data for e in await data(stream, len(head))] == head
            # Two viewers (a WebSocket and a stream): a third of either kind is refused.
            await send(refused, resume(session_id))
            error = await recv(refused)
            assert_clean_error(error, "too_many_viewers")
            assert error["session_id"] == session_id
            await assert_nothing_more(refused)  # still open, given none of the session
            for handle in (first, second):
                answer = await client.get(events_url(handle, session_id), headers=auth())
                assert answer.status_code == 429
                assert answer.headers["content-type"] == "application/json"
                assert answer.headers["retry-after"] == "1"
                assert_clean_error(answer.json(), "too_many_viewers")
                assert answer.json()["session_id"] == session_id
            assert len(await store.viewers.entries(SessionId(session_id))) == 2
            gated.gate.set()
            rest = await data(stream)
        assert [e.data for e in rest] == await frames_until_complete(opener)
    assert [e.data for e in rest] == (await logged_frames(store, session_id))[len(head) :]


async def test_a_stream_that_ends_frees_its_place(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    limited = settings.model_copy(update={"max_viewers_per_session": 2})
    gated = Gated("gated", before=2, after=2)
    await start_worker([gated.agent])
    gateway = await start_gateway(limited)
    async with viewer(gateway) as opener, viewer(gateway) as waiting, httpx.AsyncClient(timeout=20) as client:
        session_id, head = await open_session(opener, gated)
        async with client.stream("GET", events_url(gateway, session_id), headers=auth()) as response:
            assert response.status_code == 200
            assert [e.data for e in await data(events(response), 1)] == head[:1]
            refused = await client.get(events_url(gateway, session_id), headers=auth())
            assert refused.status_code == 429
        # The client went away: its place is given back, and another viewer is admitted.
        await eventually(lambda: _no_streams(store, session_id), what="the stream to leave")

        async def admitted() -> list[bytes] | None:
            await send(waiting, resume(session_id))
            reply = (await waiting.recv()).encode()
            if orjson.loads(reply).get("code") == "too_many_viewers":
                return None
            return [reply, *await frames(waiting, len(head) - 1)]

        assert await eventually(admitted, what="room for another viewer") == head
        # Full again (the opener and the WebSocket): the next stream is refused once more.
        refused = await client.get(events_url(gateway, session_id), headers=auth())
        assert refused.status_code == 429
        gated.gate.set()
        assert await frames_until_complete(waiting) == await frames_until_complete(opener)


async def test_a_completed_sessions_streams_only_replay_and_are_not_counted(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=1, after=1)
    gated.gate.set()
    await start_worker([gated.agent])
    gateway = await start_gateway(settings.model_copy(update={"max_viewers_per_session": 1}))
    async with viewer(gateway) as opener, httpx.AsyncClient(timeout=20) as client:
        await send(opener, judgement_message(["gated"]))
        seen = await frames_until_complete(opener)
        session_id = orjson.loads(seen[0])["session_id"]
        # The opener may still be listed; replays of the finished session are not refused.
        async with (
            client.stream("GET", events_url(gateway, session_id), headers=auth()) as one,
            client.stream("GET", events_url(gateway, session_id), headers=auth()) as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)
            assert not await stream_entries(store, session_id)
            assert [e.data for e in await data(events(one))] == seen
            assert [e.data for e in await data(events(two))] == seen


async def test_a_stream_is_not_published_to(
    settings: Settings,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    store: Store,
    redis_client: Redis,
) -> None:
    """A session followed only by an event stream (opened by ``POST /v1/judgements``) is
    published to no instance: the stream reads the log itself."""
    gated = Gated("gated", before=2, after=10)
    await start_worker([gated.agent])
    gateway = await start_gateway(settings)
    channel = Keys(settings.redis_key_prefix).gateway_channel(instance(gateway))
    pubsub = redis_client.pubsub()
    async with httpx.AsyncClient(timeout=20) as client:
        request = client.stream(
            "POST",
            f"{gateway.http}/v1/judgements",
            json={"agent_ids": ["gated"], "data": {"user_input": "Tea?"}},
            headers={**SSE, **auth()},
        )
        async with request as response:
            assert response.status_code == 200
            stream = events(response)
            head = await data(stream, 1 + gated.before)
            session_id = head[0].message["session_id"]
            assert [i for i, _ in await stream_entries(store, session_id)] == [instance(gateway)]
            await pubsub.subscribe(channel)
            confirmed = await pubsub.get_message(timeout=10)
            assert confirmed is not None
            assert confirmed["type"] == "subscribe"
            gated.gate.set()
            rest = await data(stream)
    assert rest[-1].event == "agent_judgement_complete"
    assert [e.data for e in head + rest] == await logged_frames(store, session_id)
    # What reached the instance's channel while the rest was logged: only our marker.
    await redis_client.publish(channel, b"marker")
    received: list[bytes] = []
    while not received or received[-1] != b"marker":
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
        assert message is not None
        received.append(message["data"])
    assert received == [b"marker"]
    await pubsub.aclose()


async def test_a_streams_lease_is_renewed_whatever_the_keepalive(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    # Leases of 0.6 s, keepalives every 30 s: the stream must renew on its own schedule.
    short = settings.model_copy(
        update={"viewer_lease_s": 0.6, "sse_keepalive_s": 30.0, "max_viewers_per_session": 2}
    )
    gated = Gated("gated", before=1, after=1)
    await start_worker([gated.agent])
    gateway = await start_gateway(short)
    async with viewer(gateway) as opener, viewer(gateway) as refused, httpx.AsyncClient(timeout=20) as client:
        session_id, head = await open_session(opener, gated)
        async with client.stream("GET", events_url(gateway, session_id), headers=auth()) as response:
            assert response.status_code == 200
            stream = events(response)
            assert [e.data for e in await data(stream, len(head))] == head
            # For five leases (the opener's renewals prune expired entries every 0.2 s), the
            # idle stream stays registered, and keeps its place.
            until = asyncio.get_running_loop().time() + 5 * short.viewer_lease_s
            while asyncio.get_running_loop().time() < until:
                assert await stream_entries(store, session_id), "the stream's lease ran out"
                await asyncio.sleep(0.05)
            await send(refused, resume(session_id))
            assert_clean_error(await recv(refused), "too_many_viewers")
            gated.gate.set()
            rest = await data(stream)
        assert [e.data for e in rest] == await frames_until_complete(opener)


CHUNK = "x" * 60_000


def bulky_gated(gate: asyncio.Event) -> Any:
    """An agent that thinks about 9 MB (more than every buffer on the way holds), then waits."""

    @agent("bulky")
    async def bulky(user_input: str, ctx: Context) -> Judgement:
        for _ in range(150):
            await ctx.think(CHUNK)
        await asyncio.wait_for(gate.wait(), 30)
        return Judgement("done", decision="approve")

    return bulky


async def test_a_slow_reader_dropped_leaves(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store
) -> None:
    gate = asyncio.Event()
    await start_worker([bulky_gated(gate)])
    gateway = await start_gateway(settings.model_copy(update={"sse_write_timeout_s": 0.5}))
    async with viewer(gateway) as opener:
        await send(opener, judgement_message(["bulky"]))
        session_id = (await recv(opener, 20))["session_id"]
        # A client with a small receive window that never reads its stream.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        request = f"GET /v1/sessions/{session_id}/events HTTP/1.1\r\nHost: t\r\nX-Magi-Appid: {APPID}\r\n"
        writer.write(f"{request}X-Magi-Token: {make_token()}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await stream_entries(store, session_id)
        # Dropped for not reading (the session still running): its place is given back.
        await eventually(
            lambda: _no_streams(store, session_id), timeout=20, what="the dropped stream to leave"
        )
        writer.close()
        gate.set()


async def test_streams_leave_when_the_server_shuts_down(
    settings: Settings, start_worker: StartWorker, store: Store
) -> None:
    gated = Gated("gated", before=2, after=1)
    await start_worker([gated.agent])
    app = create_app(settings)
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
                json={"agent_ids": ["gated"], "data": {"user_input": "Tea?"}},
                headers={**SSE, **auth()},
            ) as response,
        ):
            stream = events(response)
            head = await data(stream, 1 + gated.before)
            session_id = head[0].message["session_id"]
            assert await stream_entries(store, session_id)
            server.should_exit = True
            assert await data(stream) == []  # ended, nothing more
        await asyncio.wait_for(serving, 5)
        assert not await stream_entries(store, session_id)  # left before the server stopped
    finally:
        server.should_exit = True
        gated.gate.set()
        await asyncio.gather(serving, return_exceptions=True)


async def test_openapi_lists_too_many_viewers_for_the_stream_routes(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as client:
        paths = (await client.get("/v1/openapi.json", headers=auth())).json()["paths"]
    for path, method in (("/v1/judgements", "post"), ("/v1/sessions/{session_id}/events", "get")):
        assert "too_many_viewers" in paths[path][method]["responses"]["429"]["description"]
    assert (
        "too_many_viewers" not in paths["/v1/sessions/{session_id}"]["get"]["responses"]["429"]["description"]
    )
