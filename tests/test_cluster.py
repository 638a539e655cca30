"""The gateway and workers on a local 3-master Redis Cluster (same binary as the other fixtures,
started by ``embedded.LocalCluster``).

``redis_url`` and ``redis_client`` are overridden for this module, so the end-to-end
and resume tests imported below run unchanged against the cluster; the tests of this
file add two gateways and two workers sharing it, and check that sessions really
spread over the shards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from magi_gateway.agents import BenchAgent
from magi_gateway.embedded import LocalCluster
from magi_gateway.redis.client import RedisClient, connect
from magi_gateway.redis.urls import parse_cluster_url
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from . import agents_for_tests
from ._support import (
    GatewayHandle,
    assert_well_formed,
    collect_sessions,
    judge,
    judgement_message,
    recv,
    send,
)
from .test_delivery import (  # noqa: F401 - collected here again, on the cluster
    store,
    test_an_agent_that_streams_before_the_cancel_notice_arrives_sees_a_cancel,
    test_cancel_stops_pending_agents_and_keeps_finished_ones,
    test_resume_gets_exactly_the_missed_messages_then_live_ones,
    test_timeout_is_enforced_after_the_starting_gateway_died,
)
from .test_e2e import test_two_gateway_processes_and_an_agent_process  # noqa: F401
from .test_http_api import (  # noqa: F401 - the /v1 event streams (XREAD per session) on the cluster
    test_post_judgement_streams_the_session_as_sse,
    test_resume_by_last_event_id_on_another_instance_gets_exactly_the_rest,
)
from .test_viewers import (  # noqa: F401 - collected here again, on the cluster
    test_one_viewer_disconnecting_does_not_disturb_the_others,
    test_over_the_viewer_limit_resume_is_refused_and_the_connection_stays,
    test_viewers_of_one_session_receive_identical_sequences,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("cluster")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_url(local_cluster: LocalCluster) -> str:
    """Overrides the session's standalone server: everything in this module uses the cluster."""
    return local_cluster.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect(Settings(_env_file=None, redis_url=redis_url))  # type: ignore[call-arg]
    try:
        yield client
    finally:
        await client.aclose()


def test_cluster_urls_are_parsed() -> None:
    parsed = parse_cluster_url("rediss+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001/ignored")
    assert parsed is not None
    assert parsed.nodes == (("10.0.0.1", 7000), ("::1", 7001))
    assert (parsed.username, parsed.password, parsed.ssl) == ("u", "p@ss", True)
    assert parse_cluster_url("redis://localhost:6379/0") is None
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_cluster_url("redis+cluster://node-without-port")


async def test_two_gateways_two_workers_sessions_on_every_shard(
    settings: Settings,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    local_cluster: LocalCluster,
) -> None:
    assert settings.redis_dsn.startswith("redis+cluster://")
    gateways = [await start_gateway(settings), await start_gateway(settings)]
    streaming = BenchAgent("streaming", chunks=10, chunk_bytes=64, delay_s=0.005)
    workers = [
        await start_worker([streaming, agents_for_tests.echo]),
        await start_worker([streaming, agents_for_tests.echo]),
    ]

    async def client(handle: GatewayHandle, count: int) -> list[str]:
        async with await handle.connect() as ws:
            for _ in range(count):
                await send(ws, judgement_message(["streaming", "echo"]))
            records = await collect_sessions(ws, count, timeout=30)
        for record in records.values():
            assert_well_formed(record, ["streaming", "echo"])
            assert len(record.of_type("agent_judgement_stream")) >= 10
            assert all(f["result_code"] == 0 for f in record.finals.values())
        return list(records)

    results = await asyncio.gather(*(client(gateways[i % 2], 6) for i in range(4)))
    sessions = [s for found in results for s in found]
    assert len(set(sessions)) == 24
    # Both workers took part, and the sessions' keys live on every one of the three shards.
    assert all(worker.processed > 0 for worker in workers)
    per_node = []
    for node in local_cluster.nodes:
        plain = redis.Redis(host=node.host, port=node.port)
        try:
            per_node.append(len(list(plain.scan_iter(match=f"{settings.redis_key_prefix}:s:*:log"))))
        finally:
            plain.close()
    assert sum(per_node) == 24
    assert all(count > 0 for count in per_node), per_node


async def test_resume_on_the_other_gateway_of_the_cluster(
    settings: Settings, start_gateway: StartGateway, start_worker: StartWorker
) -> None:
    first, second = await start_gateway(settings), await start_gateway(settings)
    await start_worker([BenchAgent("paced", chunks=30, chunk_bytes=32, delay_s=0.02)])
    async with await first.connect() as ws:
        await send(ws, judgement_message(["paced"]))
        seen = [await recv(ws) for _ in range(5)]
    session_id = seen[0]["session_id"]
    async with await second.connect() as ws:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 5})
        rest = []
        while not rest or rest[-1]["type"] != "agent_judgement_complete":
            rest.append(await recv(ws))
    seqs = [m["seq"] for m in seen + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    # And a fresh judgement on the second gateway works as well.
    async with await second.connect() as ws:
        assert_well_formed(await judge(ws, ["paced"]), ["paced"])
