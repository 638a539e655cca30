"""``/metrics`` scraped over HTTP from a live gateway, and JSON logs with ids.

Metrics are per process and tests share the process, so each test compares a scrape
before and after what it does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from magi_gateway import Context, Judgement, agent
from magi_gateway.logs import ContextIds, connection_id_var, formatter, session_id_var
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import AgentStats, Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from . import agents_for_tests
from ._support import APPID, GatewayHandle, assert_well_formed, judge, recv, send

StartWorker = Callable[..., Awaitable[Worker]]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(gateway: GatewayHandle) -> Samples:
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@agent("streamer")
async def streamer(user_input: str, ctx: Context) -> Judgement:
    for i in range(5):
        await ctx.think(f"step {i}")
    return Judgement("fine", decision="approve")


async def test_metrics_count_a_session_from_connection_to_complete(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker([streamer, agents_for_tests.echo])
    before = await scrape(gateway)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["streamer", "echo"])
        assert_well_formed(record, ["streamer", "echo"])
        during = await scrape(gateway)
        assert value(during, "magi_connections") == value(before, "magi_connections") + 1
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"
        await send(ws, {"type": "nonsense"})
        assert (await recv(ws))["code"] == "unknown_type"
    after = await scrape(gateway)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    streams = len(record.of_type("agent_judgement_stream"))
    assert streams >= 5
    assert grew("magi_messages_out_total", type="agent_judgement_stream") == streams
    assert grew("magi_messages_out_total", type="agent_judgement_final") == 2
    assert grew("magi_messages_out_total", type="agent_judgement_complete") == 1
    assert grew("magi_messages_out_total", type="connection_established") == 1
    assert grew("magi_messages_in_total", type="agent_judgement") == 1
    assert grew("magi_messages_in_total", type="ping") == 1
    assert grew("magi_messages_in_total", type="invalid") == 1
    assert grew("magi_client_errors_total", code="unknown_type") == 1
    assert grew("magi_sessions_started_total") == 1
    assert grew("magi_sessions_completed_total") == 1
    # Every message the client got was counted, with its bytes (at least its JSON).
    sent = sum(len(orjson.dumps(m)) for m in record.messages)
    assert grew("magi_bytes_out_total") >= sent
    assert grew("magi_bytes_in_total") > 0
    # Latency histograms: one first chunk, two finals, all within the session's life.
    assert grew("magi_time_to_first_chunk_seconds_count") == 1
    assert grew("magi_time_to_final_seconds_count") == 2
    assert 0 < grew("magi_time_to_first_chunk_seconds_sum") < 20
    assert grew("magi_time_to_final_seconds_sum") >= grew("magi_time_to_first_chunk_seconds_sum")
    # The connection is gone again.
    assert value(after, "magi_connections") == value(before, "magi_connections")


async def test_metrics_count_resumes_and_auth_failures(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker([agents_for_tests.echo])
    before = await scrape(gateway)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["echo"])
        session_id = record.messages[0]["session_id"]
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 1})
        replayed = await recv(ws)
        assert replayed["seq"] == 2
        await send(ws, {"type": "resume", "session_id": "0" * 32, "last_seq": 0})
        while (await recv(ws)).get("code") != "session_not_found":
            pass
    async with websockets.connect(gateway.ws_url(token="wrong")) as bad:
        assert orjson.loads(await bad.recv())["code"] == "auth_failed"
        with pytest.raises(websockets.ConnectionClosed):
            await bad.recv()
    after = await scrape(gateway)
    assert (
        value(after, "magi_resumes_total", outcome="ok") - value(before, "magi_resumes_total", outcome="ok")
        == 1
    )
    assert (
        value(after, "magi_resumes_total", outcome="not_found")
        - value(before, "magi_resumes_total", outcome="not_found")
        == 1
    )
    assert (
        value(after, "magi_auth_failures_total", reason="bad_token")
        - value(before, "magi_auth_failures_total", reason="bad_token")
        == 1
    )


async def test_metrics_show_running_sessions_and_each_agents_queue(
    gateway: GatewayHandle,
) -> None:
    # A live worker for "backlog" that reads nothing: requests pile up in its stream.
    store = gateway.gateway.store
    await store.liveness.heartbeat("idle-worker", ["backlog"], 10_000)
    await store.redis.xgroup_create(store.keys.requests("backlog", APPID), "workers", id="0", mkstream=True)
    async with await gateway.connect() as ws:
        for _ in range(3):
            await send(ws, {"type": "agent_judgement", "agent_ids": ["backlog"], "data": {"user_input": "x"}})
            assert (await recv(ws))["type"] == "agent_judgement_accepted"
        samples = await scrape(gateway)
        assert value(samples, "magi_agent_queue_lag", agent="backlog") == 3
        assert value(samples, "magi_agent_pending", agent="backlog") == 0
        assert value(samples, "magi_agent_workers", agent="backlog") == 1
        assert value(samples, "magi_sessions", state="running") >= 3
        assert value(samples, "magi_sessions", state="delivering") >= 3
        # A worker reads one: it moves from lag to pending.
        stream = store.keys.requests("backlog", APPID)
        await store.redis.xreadgroup("workers", "reader", {stream: ">"}, count=1)
        samples = await scrape(gateway)
        assert value(samples, "magi_agent_queue_lag", agent="backlog") == 2
        assert value(samples, "magi_agent_pending", agent="backlog") == 1


async def test_json_logs_carry_connection_and_session_ids(gateway: GatewayHandle) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(ContextIds())
    logging.getLogger("magi_gateway").addHandler(keep)
    try:
        # Force a log line inside a frame's task: an unexpected failure while opening a session.
        async with await gateway.connect() as ws:
            original = gateway.gateway.store.claim_and_count

            async def broken(*args: object) -> object:
                raise RuntimeError("boom")

            gateway.gateway.store.claim_and_count = broken  # type: ignore[method-assign,assignment]
            try:
                await send(ws, {"type": "agent_judgement", "agent_ids": ["a"], "data": {"user_input": "x"}})
                assert (await recv(ws))["code"] == "internal_error"
            finally:
                gateway.gateway.store.claim_and_count = original  # type: ignore[method-assign]
    finally:
        logging.getLogger("magi_gateway").removeHandler(keep)
    failure = next(r for r in records if "unexpected error" in r.getMessage())
    line = orjson.loads(formatter("json").format(failure))
    assert line["level"] == "ERROR"
    assert line["logger"] == "magi_gateway.server.gateway"
    assert line["connection_id"]
    assert line["connection_id"] in line["message"]
    assert len(line["session_id"]) == 32
    assert "RuntimeError: boom" in line["exc_info"]


def test_context_filter_leaves_explicit_ids_and_text_format_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.session_id = "explicit"
    token = session_id_var.set("from-context")
    conn = connection_id_var.set("c1")
    try:
        assert ContextIds().filter(record)
    finally:
        session_id_var.reset(token)
        connection_id_var.reset(conn)
    assert record.session_id == "explicit"
    assert record.connection_id == "c1"  # type: ignore[attr-defined]
    assert formatter("text").format(record) == "INFO x: hello"


async def test_queue_stats_for_an_agent_without_a_stream(settings: Settings, redis_client: Redis) -> None:
    store = Store(redis_client, Keys(settings.redis_key_prefix))
    await store.liveness.heartbeat("w", ["nostream"], 10_000)
    stats = await store.liveness.agent_stats()
    assert stats == {"nostream": AgentStats(workers=1, lag=0, pending=0)}
    assert await store.deadlines.running() == 0


class StallingProxy:
    """A TCP proxy to Redis that can stop relaying the gateway's notification connection.

    It recognises that connection by the client name redis-py sends when connecting,
    and while stalled it neither closes it nor forwards a byte: a subscription that is
    dead without any error, the case a plain PING cannot see.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.notify_connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        notify = False
        seen = b""

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            nonlocal notify, seen
            try:
                while data := await src.read(65536):
                    if from_client and not notify and len(seen) < 4096:
                        # redis-py names the connection in its first commands.
                        seen += data
                        if b"magi-gateway-notify" in seen:
                            notify = True
                            self.notify_connections += 1
                    if notify:
                        await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.flowing.set()


async def test_readyz_fails_while_the_subscription_is_stalled(
    settings: Settings, redis_url: str, start_gateway: Callable[[Settings], Awaitable[GatewayHandle]]
) -> None:
    proxy = StallingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    port = await proxy.start()
    try:
        gateway = await start_gateway(
            settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
        )
        async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
            assert (await http.get("/readyz")).status_code == 200
            assert proxy.notify_connections == 1
            proxy.flowing.clear()  # the subscription stays connected but hears nothing
            stalled = await http.get("/readyz")
            assert stalled.status_code == 503
            assert stalled.json()["status"] == "not ready"
            assert (await http.get("/healthz")).status_code == 200  # alive, just not ready
            proxy.flowing.set()
            assert (await http.get("/readyz")).status_code == 200
    finally:
        await proxy.close()
