"""``MagiClient`` against real gateways (in-process and subprocesses), real workers, real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
from redis.asyncio import Redis

from magi_gateway.agents import demo_agents
from magi_gateway.client import ConnectionLost, MagiClient
from magi_gateway.core.errors import AuthenticationFailed, GatewayError
from magi_gateway.core.ids import SessionId
from magi_gateway.core.notification import Message
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.server.delivery import Delivery
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import (
    DEMO,
    Gated,
    eventually,
    logged,
    scan_keys,
)
from ._support import (
    APPID,
    SECRET,
    GatewayHandle,
    SessionRecord,
    assert_well_formed,
    recv,
    send,
    spawn_gateway,
    stop_process,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]
WEAPON = "Should we deploy the untested weapon?"


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> Store:
    return Store(redis_client, Keys(settings.redis_key_prefix))


def url_of(handle: GatewayHandle) -> str:
    return f"ws://127.0.0.1:{handle.port}/ws"


def client_for(*handles: GatewayHandle, **kwargs: Any) -> MagiClient:
    urls = [url_of(h) for h in handles]
    return MagiClient(urls if len(urls) > 1 else urls[0], appid=APPID, secret=SECRET, **kwargs)


async def collect(client: MagiClient, text: str, agent_ids: list[str], **kwargs: Any) -> SessionRecord:
    record = SessionRecord()
    async for message in client.judge(text, agent_ids, **kwargs):
        record.messages.append(message)
    return record


def drop_connections(handle: GatewayHandle) -> int:
    """Make the gateway close every client connection it has (as a slow reader would be)."""
    assert handle.gateway is not None
    connections = list(handle.gateway._connections.values())
    for connection in connections:
        connection.request_close(1013, "test drop")
    return len(connections)


async def session_count(redis: Redis, prefix: str) -> int:
    return len(await scan_keys(redis, f"{prefix}:s:*:meta"))


# -- the basics ---------------------------------------------------------------------------------


async def test_judge_yields_a_well_formed_session(
    gateway: GatewayHandle, start_worker: StartWorker, store: Store
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with client_for(gateway) as client:
        assert client.connection_id
        record = await collect(client, WEAPON, DEMO, request_id="client-req-1")
        assert client.reconnects == 0
    assert_well_formed(record, DEMO)
    assert record.messages[0]["request_id"] == "client-req-1"
    assert {a: f["result_code"] for a, f in record.finals.items()} == dict.fromkeys(DEMO, 0)
    assert record.complete["data"]["verdict"] == "reject"
    assert record.messages == await logged(store, record.messages[0]["session_id"])


async def test_agents_and_ping(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    async with client_for(gateway) as client:
        await client.ping()
        assert await client.agents() == []
        await start_worker(demo_agents(delay_s=0.01))
        agents = await client.agents()
        await client.ping()
    assert sorted(a["agent_id"] for a in agents) == sorted(DEMO)
    assert all(a["workers"] == 1 for a in agents)


async def test_two_concurrent_judgements_on_one_client(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.02))
    async with client_for(gateway) as client:
        weapon, tea, pong = await asyncio.gather(
            collect(client, WEAPON, DEMO),
            collect(client, "Shall we have tea?", ["casper", "balthasar"]),
            client.ping(),
        )
    assert pong is None
    assert_well_formed(weapon, DEMO)
    assert_well_formed(tea, ["casper", "balthasar"])
    assert weapon.messages[0]["session_id"] != tea.messages[0]["session_id"]
    assert weapon.complete["data"]["verdict"] == "reject"
    assert tea.complete["data"]["verdict"] == "approve"


class LateDelivery(Delivery):
    """The gateway's delivery, with every live notification handed over 50 ms late."""

    def __init__(self, delivery: Delivery) -> None:
        self.__dict__.update(delivery.__dict__)  # the same state: one delivery, late

    def deliver(self, session_id: SessionId, messages: Iterable[Message]) -> None:
        late = list(messages)
        asyncio.get_running_loop().call_later(0.05, super().deliver, session_id, late)


async def test_concurrent_ping_agents_and_judgements_each_get_their_own_reply(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    """pong, agents and errors come back out of request order; each still finds its request."""
    gateway = await start_gateway(
        settings.model_copy(update={"max_messages_per_s": 1000, "message_burst": 1000})
    )
    assert gateway.gateway is not None
    # Notifications (the accepted among them) come through Redis a little late, as under load.
    gateway.gateway.listener.delivery = LateDelivery(gateway.gateway.delivery)
    await start_worker(demo_agents(delay_s=0))

    async def refused() -> str:
        with pytest.raises(GatewayError) as caught:
            await collect(client, WEAPON, ["not an agent id!"])
        return str(caught.value.code)

    async with client_for(gateway) as client:
        for _ in range(10):
            # Judgements sent first; their accepted comes through Redis, the others' replies
            # straight from the gateway: out of request order.
            calls: list[Awaitable[Any]] = []
            for _ in range(4):
                calls += [collect(client, WEAPON, ["melchior"]), client.ping(), client.agents(), refused()]
            replies = await asyncio.gather(*calls)
            for record, pong, agents, code in zip(*[iter(replies)] * 4, strict=True):
                assert_well_formed(record, ["melchior"])
                assert pong is None
                assert sorted(a["agent_id"] for a in agents) == sorted(DEMO)
                assert code == "invalid_field"


async def test_replies_echo_the_request_id_of_the_message(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}  # the documented frame, unchanged
        await send(ws, {"type": "ping", "request_id": "p-1"})
        assert await recv(ws) == {"type": "pong", "request_id": "p-1"}
        await send(ws, {"type": "get_agents", "request_id": "a-1"})
        assert await recv(ws) == {"type": "agents", "agents": [], "request_id": "a-1"}
        await send(ws, {"type": "resume", "session_id": "nope", "last_seq": 0, "request_id": "r-1"})
        error = await recv(ws)
        assert (error["code"], error["request_id"]) == ("invalid_field", "r-1")
        await send(ws, {"type": "nonsense", "request_id": "n-1"})
        error = await recv(ws)
        assert (error["code"], error["request_id"]) == ("unknown_type", "n-1")


async def test_bad_secret_fails_connect_with_authentication_failed(gateway: GatewayHandle) -> None:
    client = MagiClient(url_of(gateway), appid=APPID, secret="not-the-secret")
    with pytest.raises(AuthenticationFailed) as failed:
        await client.connect()
    assert failed.value.code == "auth_failed"
    await client.close()
    # Nothing keeps running: no background task, no connection.
    assert client._runner is None


# -- reconnecting -------------------------------------------------------------------------------


@pytest.mark.parametrize("instances", [1, 2])
async def test_judgement_survives_a_dropped_connection(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, store: Store, instances: int
) -> None:
    gated = Gated("gated", before=3, after=4)
    await start_worker([gated.agent, *demo_agents(delay_s=0.02)])
    handles = [await start_gateway(settings) for _ in range(instances)]
    agents = ["gated", *DEMO]
    record = SessionRecord()
    async with client_for(*handles) as client:
        async for message in client.judge("Shall we have tea?", agents):
            record.messages.append(message)
            if len(record.messages) == 1:
                # A barrier: the pong follows the gateway's handling of the judgement frame.
                await client.ping()
            if len(record.messages) == 3:
                assert drop_connections(handles[0]) == 1
                gated.gate.set()  # the rest is produced while the client is away
        assert client.reconnects >= 1
        assert client.url == url_of(handles[-1])  # with two instances, it moved to the other one
        await client.ping()  # the new connection works for requests too
    assert_well_formed(record, agents)  # every seq exactly once, in order
    assert {a: f["result_code"] for a, f in record.finals.items()} == dict.fromkeys(agents, 0)
    assert record.messages == await logged(store, record.messages[0]["session_id"])
    assert gated.invocations == 1


async def test_judgement_sent_while_disconnected_is_delivered_after_reconnect(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker, redis_client: Redis
) -> None:
    gateway = await start_gateway(settings)
    gated = Gated("gated", before=1, after=1)
    gated.gate.set()
    await start_worker([gated.agent])
    async with client_for(gateway, backoff_base_s=0.5) as client:
        await client.ping()
        drop_connections(gateway)

        async def disconnected() -> bool:
            return not client._connected.is_set()

        await eventually(disconnected, timeout=5, what="the client to notice the drop")
        # Reconnecting takes 0.5-1 s: the judgement is asked for while there is no connection.
        record = await asyncio.wait_for(collect(client, "tea?", ["gated"], request_id="offline-1"), 15)
        assert client.reconnects == 1
    assert_well_formed(record, ["gated"])
    assert record.messages[0]["request_id"] == "offline-1"
    assert gated.invocations == 1
    assert await session_count(redis_client, settings.redis_key_prefix) == 1


async def test_judgement_resent_after_a_drop_before_accepted_is_not_started_twice(
    gateway: GatewayHandle,
    start_worker: StartWorker,
    settings: Settings,
    redis_client: Redis,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gated = Gated("gated", before=2, after=2)
    gated.gate.set()
    await start_worker([gated.agent])
    service = gateway.gateway
    assert service is not None
    open_judgement = service.open_judgement
    calls: list[str | None] = []

    async def open_then_drop(connection: Any, request: Any) -> None:
        calls.append(request.request_id)
        if len(calls) == 1:
            # The session starts, but this connection never sees its accepted message.
            monkeypatch.setattr(connection, "push", lambda frame, kind: False)
            await open_judgement(connection, request)
            connection.request_close(1013, "test drop")
        else:
            await open_judgement(connection, request)

    monkeypatch.setattr(service, "open_judgement", open_then_drop)
    async with client_for(gateway) as client:
        record = await asyncio.wait_for(collect(client, "tea?", ["gated"]), 15)
        assert client.reconnects >= 1
    assert_well_formed(record, ["gated"])
    # The client re-sent the same request_id; the gateway replayed the one session.
    assert len(calls) == 2
    assert calls[0] == calls[1] == record.messages[0]["request_id"]
    assert gated.invocations == 1
    assert await session_count(redis_client, settings.redis_key_prefix) == 1
    assert record.messages == await logged(store, record.messages[0]["session_id"])


async def test_gives_up_with_connection_lost_when_every_gateway_is_gone(
    redis_url: str, settings: Settings, start_worker: StartWorker
) -> None:
    env = {"REDIS_URL": redis_url, "FIXED_SECRET": SECRET, "REDIS_KEY_PREFIX": settings.redis_key_prefix}
    handle = await asyncio.to_thread(spawn_gateway, env)
    assert handle.process is not None
    try:
        gated = Gated("gated", before=1, after=1)
        await start_worker([gated.agent])
        client = client_for(handle, max_reconnects=1, backoff_base_s=0.05, open_timeout_s=2)
        await client.connect()
        try:
            received: list[dict[str, Any]] = []

            async def consume() -> None:
                async for message in client.judge("tea?", ["gated"]):
                    received.append(message)
                    if len(received) == 2:  # accepted and the first chunk: now every gateway goes
                        handle.process.kill()  # type: ignore[union-attr]

            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(consume(), 15)
            assert [m["seq"] for m in received] == [1, 2]
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(client.ping(), 5)  # later requests fail at once too
        finally:
            await client.close()
            gated.gate.set()
    finally:
        stop_process(handle.process)


async def test_judgement_answered_by_a_session_error_ends_instead_of_hanging(
    settings: Settings, start_gateway: StartGateway, store: Store
) -> None:
    # The request_id's idempotency key outlives the session it names (TTL timeout + retention
    # from the start, vs retention from the completion), so reusing the id in between is
    # answered with session_not_found naming that session.
    short = settings.model_copy(update={"session_retention_s": 1})
    gateway = await start_gateway(short)
    async with client_for(gateway) as client:
        first = await collect(client, "tea?", ["nobody"], request_id="reused")
        session_id = first.messages[0]["session_id"]

        async def expired() -> bool:
            return await store.session_info(session_id) is None

        await eventually(expired, timeout=6, what="the session to expire")

        async def attempt() -> SessionRecord | GatewayError:
            try:
                return await collect(client, "tea?", ["nobody"], request_id="reused")
            except GatewayError as exc:  # an error is a fine answer; hanging is not
                return exc

        outcome = await asyncio.wait_for(attempt(), 4)
    if isinstance(outcome, GatewayError):
        assert outcome.code == "session_not_found"
    else:
        assert_well_formed(outcome, ["nobody"])
