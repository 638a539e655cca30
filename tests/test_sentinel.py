"""Redis Sentinel: the ``redis+sentinel://`` URL, and failovers while sessions stream (DESIGN §3).

The URL tests are synchronous. The failover tests run real processes on 127.0.0.1: one
master, one replica and three sentinels (``tests/_sentinel.py``), a ``serve`` gateway
and a ``bench`` worker, both given the sentinel URL. Sessions stream on one WebSocket
while the master is failed over: planned (writes paused on the master, then ``SENTINEL
FAILOVER``, see ``SentinelGroup.failover``) or by SIGKILL. Each session must reach the
client with seqs 1..n exactly once, one final per agent, one complete, and what the
client saw must be exactly what the new master holds: nothing acknowledged was lost.

The data nodes run with ``min-replicas-to-write 1`` (see ``tests/_sentinel.py``): with a
single replica, writes pause after a failover until the old master rejoins as a replica
(Sentinel reconfigures it about 10 s later), which is why these tests take ~20 s each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.sentinel import FailoverPool
from magi_gateway.redis.store import Store
from magi_gateway.redis.urls import SentinelURL, parse_sentinel_url
from magi_gateway.settings import Settings

from ._sentinel import SentinelGroup
from ._support import SessionRecord, assert_well_formed, judgement_message, send
from .test_faults import (
    AGENT,
    Collector,
    Proc,
    bench_worker,
    process_env,
    start_gateway_process,
    stop_all,
    wait_live_workers,
)

logger = logging.getLogger(__name__)

# -- the URL ------------------------------------------------------------------------------------


def test_parse_full_url() -> None:
    url = (
        "redis+sentinel://app:p%40ss@s1.example:26380,[::1]:26381,s3.example/cache/2"
        "?sentinel_username=watch&sentinel_password=s%26cret&max_connections=32"
    )
    assert parse_sentinel_url(url) == SentinelURL(
        sentinels=(("s1.example", 26380), ("::1", 26381), ("s3.example", 26379)),
        service_name="cache",
        db=2,
        username="app",
        password="p@ss",
        sentinel_username="watch",
        sentinel_password="s&cret",
        max_connections=32,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://h/mymaster", SentinelURL(sentinels=(("h", 26379),), service_name="mymaster")),
        ("redis+sentinel://h:1/m/", SentinelURL(sentinels=(("h", 1),), service_name="m")),
        ("REDIS+SENTINEL://:pw@h:2/m/0", SentinelURL(sentinels=(("h", 2),), service_name="m", password="pw")),
        (
            "rediss+sentinel://user@h/m/15",
            SentinelURL(sentinels=(("h", 26379),), service_name="m", db=15, username="user", ssl=True),
        ),
    ],
)
def test_parse_defaults_and_variants(url: str, expected: SentinelURL) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://h:6380", "unix:///tmp/redis.sock", "sentinel://h/m", "h:1/m"],
)
def test_other_urls_are_not_sentinel_urls(url: str) -> None:
    assert parse_sentinel_url(url) is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:hunter2@h:26379", "/SERVICE"),
        ("redis+sentinel://:hunter2@h:26379/", "/SERVICE"),
        ("redis+sentinel://:hunter2@h:26379/m/x", "DB"),
        ("redis+sentinel://:hunter2@h:26379/m/0/extra", "/SERVICE"),
        ("redis+sentinel://:hunter2@h:port/m", "HOST[:PORT]"),
        ("redis+sentinel://:hunter2@h:70000/m", "HOST[:PORT]"),
        ("redis+sentinel://:hunter2@h,,h2/m", "HOST[:PORT]"),
        ("redis+sentinel://:hunter2@[::1/m", "[IPV6]:PORT"),
        ("redis+sentinel://:hunter2@h/m?socket_timeout=1", "socket_timeout"),
        ("redis+sentinel://:hunter2@h/m?max_connections=0", "max_connections"),
    ],
)
def test_malformed_urls_are_refused_without_echoing_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        parse_sentinel_url(url)
    assert "hunter2" not in str(refused.value)


def test_settings_pass_the_sentinel_url_through() -> None:
    url = "redis+sentinel://127.0.0.1:26379/mymaster/1"
    assert Settings(_env_file=None, redis_url=url).redis_dsn == url  # type: ignore[call-arg]


async def test_connect_builds_a_blocking_sentinel_pool_with_the_usual_options() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url="redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/3?sentinel_password=sp",
    )
    client = connect(settings, client_name="magi-test", retries=0)
    try:
        pool = client.connection_pool
        assert isinstance(pool, FailoverPool)
        assert pool.service_name == "mymaster"
        assert pool.max_connections == settings.redis_max_connections
        options = pool.connection_kwargs
        assert (options["db"], options["password"], options["client_name"]) == (3, "pw", "magi-test")
        assert options["retry"].get_retries() == 0
        assert options["socket_keepalive"] is True
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"], s["password"]) for s in sentinels] == [
            ("127.0.0.1", 1, "sp"),
            ("127.0.0.1", 2, "sp"),
        ]
    finally:
        await client.aclose()


# -- failovers mid-stream -----------------------------------------------------------------------

SESSIONS = 4
#: About 3 s of streaming per session before the failover; it lands mid-stream.
CHUNKS = 60


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """One master, one replica, three sentinels."""
    started = SentinelGroup(tmp_path / "sentinel-group", replicas=1)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def group_client(group: SentinelGroup) -> AsyncIterator[Redis]:
    """A client of the group's master, through the sentinels."""
    client = connect(Settings(_env_file=None, redis_url=group.url), client_name="magi-test")  # type: ignore[call-arg]
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[list[Proc]]:
    """Gateway and worker processes, stopped at teardown (before the group); what each
    printed is kept in the test's tmp_path (``proc-PID.log``) to read after a failure."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        await stop_all(started)
        for proc in started:
            (tmp_path / f"proc-{proc.pid}.log").write_text(proc.output)


class Reader(Collector):
    """A ``Collector`` that also reads chunks per session and the gaps between messages."""

    def chunks(self, session_id: str) -> list[dict[str, Any]]:
        return self.records[session_id].of_type("agent_judgement_stream")

    async def finish(self, timeout: float) -> dict[str, SessionRecord]:
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        finally:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        return self.records

    def longest_silence_s(self) -> float:
        """The longest wait between two messages of one session."""
        return max(b - a for times in self.times.values() for a, b in itertools.pairwise(times))


async def sessions_through_failover(
    group: SentinelGroup,
    redis: Redis,
    procs: list[Proc],
    key_prefix: str,
    fail_over: Callable[[int], None],
    after_move: Callable[[int], None],
) -> tuple[dict[str, SessionRecord], int, int]:
    """Start SESSIONS judgements, fail the master over mid-stream, read them to the end.

    Returns the sessions as the client saw them, and the old and new master ports.
    """
    env = process_env(group.url, key_prefix, JUDGEMENT_TIMEOUT_S="45")
    procs.append(bench_worker(env, chunks=CHUNKS))
    gateway_proc, gateway = await start_gateway_process(env)
    procs.append(gateway_proc)
    await wait_live_workers(redis, key_prefix, 1, procs)

    async with await gateway.connect() as ws:
        reader = Reader(ws, SESSIONS)
        for i in range(SESSIONS):
            await send(ws, judgement_message([AGENT], f"Question {i}?"))
        await reader.wait_chunks(5, timeout=20)
        old = group.master_port()
        chunks_before = {s: len(reader.chunks(s)) for s in reader.records}
        triggered = time.monotonic()
        await asyncio.to_thread(fail_over, old)
        new = await asyncio.to_thread(group.wait_master_moved, old)
        moved = time.monotonic()
        await asyncio.to_thread(after_move, old)
        records = await reader.finish(timeout=45)
        finished = time.monotonic()

    assert all(count < CHUNKS for count in chunks_before.values()), "sessions finished before the failover"
    logger.info(
        "failover %.2f s; longest silence %.2f s; done %.2f s after it; %d messages; %d extra chunks",
        moved - triggered,
        reader.longest_silence_s(),
        finished - triggered,
        sum(len(r.messages) for r in records.values()),
        sum(len(reader.chunks(s)) - CHUNKS for s in records),
    )
    return records, old, new


async def assert_sessions_intact(
    records: dict[str, SessionRecord], redis: Redis, key_prefix: str, procs: list[Proc], new: int
) -> None:
    """Every session complete and well formed at the client, and identical in the new master's log."""
    assert len(records) == SESSIONS
    store = Store(redis, Keys(key_prefix))
    for session_id, record in records.items():
        assert_well_formed(record, [AGENT])  # seqs 1..n exactly once, one final, complete last
        assert record.finals[AGENT]["result_code"] == 0, record.finals[AGENT]
        streamed = record.of_type("agent_judgement_stream")
        # Every chunk arrived (one whose reply was lost mid-failover may be logged twice),
        # and the worker kept its request throughout: no second attempt.
        assert len(streamed) >= CHUNKS
        assert all("attempt" not in m["data"] for m in streamed)
        # Nothing the client saw was lost with the old master, nothing is missing.
        stored = [orjson.loads(frame) for _seq, _type, frame in await store.read_log(session_id, 1)]
        assert stored == record.messages
    for proc in procs:
        assert proc.process.poll() is None, proc.output
        assert "Traceback" not in proc.output, proc.output
        # Each process noticed the move itself and dropped its connections to the old master.
        assert f"moved to 127.0.0.1:{new}" in proc.output, proc.output


async def test_graceful_failover_mid_stream_sessions_complete(
    group: SentinelGroup,
    group_client: Redis,
    procs: list[Proc],
    key_prefix: str,
) -> None:
    records, old, new = await sessions_through_failover(
        group,
        group_client,
        procs,
        key_prefix,
        lambda _old: group.failover(),
        lambda _old: None,
    )
    await assert_sessions_intact(records, group_client, key_prefix, procs, new)
    assert group.role(old) == "slave"
    # No connection of the gateway or the worker stayed on the demoted master, not even
    # the gateway's pub/sub subscription (it would miss what the new master publishes
    # until the old one rejoins as its replica).
    old_master = Redis(port=old)
    try:
        names = [str(c["name"]) for c in await old_master.client_list()]
    finally:
        await old_master.aclose()
    assert not [n for n in names if n.startswith(("magi-gateway", "magi-worker"))], names


async def test_master_killed_mid_stream_sessions_complete(
    group: SentinelGroup,
    group_client: Redis,
    procs: list[Proc],
    key_prefix: str,
) -> None:
    def kill(port: int) -> None:
        group.node(port).kill()

    def restart(port: int) -> None:
        # Writes resume once it is back as the new master's replica (min-replicas-to-write 1).
        group.node(port).restart()

    records, old, new = await sessions_through_failover(group, group_client, procs, key_prefix, kill, restart)
    await assert_sessions_intact(records, group_client, key_prefix, procs, new)
    assert group.master_port() == new
    assert group.role(old) == "slave"
