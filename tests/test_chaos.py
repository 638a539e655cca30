"""Chaos: concurrent sessions while a worker, Redis and one of two gateways are killed.

Real processes on 127.0.0.1: one Redis (append-only, fsync always), two gateways, two
workers serving the demo agents, and clients using ``MagiClient`` with both gateway
URLs. At random moments (seeded) a worker, Redis or a gateway is SIGKILLed and
restarted. Every session must then show, at the client: seqs 1..n exactly once, one
final per agent, one complete, last. ``MAGI_CHAOS_SECONDS`` sets the chaos period
(CI runs the short default); ``MAGI_CHAOS_SEED`` the random seed.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from magi_gateway.client import MagiClient
from magi_gateway.embedded import RedisServer, free_port

from ._support import SECRET

pytestmark = pytest.mark.chaos

AGENTS = ["melchior", "balthasar", "casper"]
INPUTS = ["Shall we have tea?", "Deploy the untested weapon?", "Tell a lie to win?", "..."]
CHAOS_SECONDS = float(os.environ.get("MAGI_CHAOS_SECONDS", "20"))
SEED = int(os.environ.get("MAGI_CHAOS_SEED", "1"))
CLIENTS = 6


class Cluster:
    """The processes under test, each restartable in place (same port, same Redis data)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis = RedisServer(tmp_path / "redis", fsync="always")
        self.gateway_ports = [free_port(), free_port()]
        self.gateways: list[subprocess.Popen[bytes] | None] = [None, None]
        self.workers: list[subprocess.Popen[bytes] | None] = [None, None]
        self.logs: list[Any] = []
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "FIXED_SECRET": SECRET,
            "REDIS_KEY_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}",
            "JUDGEMENT_TIMEOUT_S": "20",
            "WORKER_CLAIM_IDLE_S": "1",
            "WORKER_HEARTBEAT_INTERVAL_S": "0.3",
            "WORKER_TTL_S": "4",
            "REDIS_BACKOFF_CAP_S": "0.5",
            "MAX_MESSAGES_PER_S": "1000",
            "MESSAGE_BURST": "1000",
        }

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("ab")
        self.logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "magi_gateway", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def start_gateway(self, index: int) -> None:
        port = self.gateway_ports[index]
        process = self._spawn(f"gateway{index}", ["serve", "--host", "127.0.0.1", "--port", str(port)])
        self.gateways[index] = process
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, "gateway exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("gateway did not start")

    def start_worker(self, index: int) -> None:
        self.workers[index] = self._spawn(f"worker{index}", ["agent", "demo"])

    def kill(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def start(self) -> None:
        self.redis.start()
        for index in (0, 1):
            self.start_gateway(index)
            self.start_worker(index)

    def stop(self) -> None:
        for process in [*self.gateways, *self.workers]:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(process)
        self.redis.stop()
        for log in self.logs:
            log.close()

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.gateway_ports]


async def wait_ready(cluster: Cluster) -> None:
    async with httpx.AsyncClient() as http:
        for port in cluster.gateway_ports:
            for _ in range(200):
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("gateway not ready")


async def run_client(
    index: int, cluster: Cluster, stop_at: float, records: list[list[dict[str, Any]]], reconnects: list[int]
) -> None:
    urls = cluster.urls[index % 2 :] + cluster.urls[: index % 2]
    rng = random.Random(SEED * 100 + index)
    async with MagiClient(urls, appid=f"chaos-{index}", secret=SECRET, backoff_cap_s=1.0) as client:
        while time.monotonic() < stop_at:
            record: list[dict[str, Any]] = []
            records.append(record)
            async for message in client.judge(rng.choice(INPUTS), AGENTS):
                record.append(message)
        reconnects.append(client.reconnects)


async def make_chaos(cluster: Cluster, stop_at: float, kills: dict[str, int]) -> None:
    rng = random.Random(SEED)
    plan = ["worker", "redis", "gateway"]
    rng.shuffle(plan)
    step = 0
    while time.monotonic() < stop_at:
        await asyncio.sleep(rng.uniform(1.5, 3.0))
        action = plan[step % len(plan)] if step < len(plan) else rng.choice(plan)
        step += 1
        if action == "worker":
            index = rng.randrange(2)
            cluster.kill(cluster.workers[index])
            await asyncio.sleep(0.5)
            cluster.start_worker(index)
        elif action == "redis":
            cluster.redis.kill()
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            await asyncio.to_thread(cluster.redis.restart)
        else:
            index = rng.randrange(2)
            cluster.kill(cluster.gateways[index])
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            await asyncio.to_thread(cluster.start_gateway, index)
        kills[action] += 1


def check_session(record: list[dict[str, Any]]) -> None:
    assert record, "a session yielded nothing"
    seqs = [m["seq"] for m in record]
    assert seqs == list(range(1, len(record) + 1)), seqs
    assert record[0]["type"] == "agent_judgement_accepted"
    finals = [m["agent_id"] for m in record if m["type"] == "agent_judgement_final"]
    assert sorted(finals) == sorted(AGENTS)
    assert [m["type"] for m in record].count("agent_judgement_complete") == 1
    assert record[-1]["type"] == "agent_judgement_complete"
    assert len({m["session_id"] for m in record}) == 1


@pytest.mark.timeout(150)
async def test_sessions_survive_killed_worker_redis_and_gateway(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    records: list[list[dict[str, Any]]] = []
    kills = {"worker": 0, "redis": 0, "gateway": 0}
    reconnects: list[int] = []
    try:
        await asyncio.to_thread(cluster.start)
        await wait_ready(cluster)
        await asyncio.sleep(1.0)  # first heartbeats
        stop_at = time.monotonic() + CHAOS_SECONDS
        clients = [
            asyncio.create_task(run_client(i, cluster, stop_at, records, reconnects)) for i in range(CLIENTS)
        ]
        await make_chaos(cluster, stop_at, kills)
        # Sessions in flight when the chaos stops must still finish.
        await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
    finally:
        await asyncio.to_thread(cluster.stop)
    for record in records:
        check_session(record)
    codes: dict[int, int] = {}
    for record in records:
        for message in record:
            if message["type"] == "agent_judgement_final":
                codes[message["result_code"]] = codes.get(message["result_code"], 0) + 1
    summary = (
        f"chaos: {len(records)} sessions, {sum(len(r) for r in records)} messages, kills {kills}, "
        f"client reconnects {sum(reconnects)}, final result codes {dict(sorted(codes.items()))}, "
        f"seed {SEED}, {CHAOS_SECONDS:g}s"
    )
    print(summary)
    (tmp_path.parent / "chaos-summary.txt").write_text(summary + "\n")
    assert all(kills.values()), kills
    assert sum(reconnects) > 0  # the gateway kills really hit connected clients
    assert len(records) >= CLIENTS
