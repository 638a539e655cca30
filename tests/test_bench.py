"""``magi-gateway bench``: a smoke run of relay and idle, and the histogram they report with.

Smoke tests only: they check that the benchmarks run end to end against real processes
and report positive figures, not how fast anything is.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import websockets

from magi_gateway.agents.bench import BenchAgent, chunk_sent_ns
from magi_gateway.bench._stats import Histogram
from magi_gateway.bench.limit_keys import ready_key
from magi_gateway.embedded import free_port

RELAY_KEYS = [
    "chunks_per_s",
    "chunk_latency_p50_ms",
    "chunk_latency_p99_ms",
    "request_latency_p50_ms",
    "request_latency_p99_ms",
    "gateway_cpu_us_per_chunk",
    "worker_cpu_us_per_chunk",
    "limit_gateway_cpu_us_per_chunk",
    "cpu_ratio_to_limit",
    "limit_chunks_per_s",
    "limit_worker_cpu_us_per_chunk",
    "limit_redis_cpu_us_per_chunk",
    "chunks_per_s_ratio_to_limit",
    "worker_cpu_ratio_to_limit",
    "redis_cpu_ratio_to_limit",
]
IDLE_KEYS = ["rss_kb_per_connection", "handshakes_per_s", "connections"]


def _bench(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "magi_gateway", "bench", *args, "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, object] = orjson.loads(out.read_bytes())
    return data


def test_bench_relay_smoke(tmp_path: Path) -> None:
    data = _bench(tmp_path, "relay", "--clients", "2", "--chunks", "5", "--bytes", "64", "--seconds", "2")
    for key in RELAY_KEYS:
        value = data[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    assert data["errors"] == {}
    assert data["limit_errors"] == {}
    assert (data["clients"], data["chunks"], data["bytes"]) == (2, 5, 64)
    machine = data["machine"]
    assert isinstance(machine, dict)
    assert machine["nproc"] >= 1
    assert machine["cpu_model"]
    assert machine["python"]


def test_bench_relay_measures_the_http_api_beside_the_websocket(tmp_path: Path) -> None:
    data = _bench(
        tmp_path,
        "relay",
        "--clients",
        "2",
        "--chunks",
        "5",
        "--bytes",
        "64",
        "--seconds",
        "2",
        "--sse",
        "--no-limit",
    )
    for key in ("chunks_per_s", "gateway_cpu_us_per_chunk", "chunk_latency_p99_ms"):
        for side in (key, f"sse_{key}"):
            value = data[side]
            assert isinstance(value, int | float), side
            assert value > 0, side
    assert data["errors"] == {}
    assert data["sse_errors"] == {}
    # Requests over HTTP were answered to their complete (the window cuts some in two).
    assert isinstance(data["sse_requests"], int)
    assert data["sse_requests"] > 0


def _wait(ready: Callable[[], object], what: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not ready():
        assert child.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"no {what} within 20 s"
        time.sleep(0.02)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_limit_baseline_relays_the_bench_frames(redis_url: str) -> None:
    """The baseline's own gateway and worker stream K stamped chunks of B bytes, in seq order."""
    prefix, port, chunks, chunk_bytes = f"test-{uuid.uuid4().hex[:8]}", free_port(), 4, 64
    common = ["--redis-url", redis_url, "--prefix", prefix]
    options = ["--name", "w", "--chunks", str(chunks), "--bytes", str(chunk_bytes)]
    worker = subprocess.Popen([sys.executable, "-m", "magi_gateway.bench.limit_worker", *common, *options])
    gateway = subprocess.Popen(
        [sys.executable, "-m", "magi_gateway.bench.limit", *common, "--port", str(port)]
    )
    client = redis.Redis.from_url(redis_url)
    try:
        _wait(lambda: client.exists(ready_key(prefix, "w")), "limit worker", worker)
        _wait(lambda: _accepts(port), "limit gateway", gateway)
        async with websockets.connect(f"ws://127.0.0.1:{port}/anything?appid=x") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connection_established"
            for request in range(2):
                sent_ns = time.time_ns()
                request_frame = {
                    "type": "agent_judgement",
                    "agent_ids": ["bench"],
                    "request_id": str(request),
                }
                await ws.send(orjson.dumps(request_frame).decode())
                frames: list[dict[str, Any]] = []
                async with asyncio.timeout(10):
                    while not frames or frames[-1]["type"] != "agent_judgement_complete":
                        frames.append(orjson.loads(await ws.recv()))
                assert [f["seq"] for f in frames] == list(range(1, chunks + 4))
                assert [f["type"] for f in frames] == [
                    "agent_judgement_accepted",
                    *["agent_judgement_stream"] * chunks,
                    "agent_judgement_final",
                    "agent_judgement_complete",
                ]
                assert len({f["session_id"] for f in frames}) == 1
                for frame in frames[1 : chunks + 1]:
                    thinking = frame["data"]["thinking"]
                    assert len(thinking) == chunk_bytes
                    assert sent_ns <= chunk_sent_ns(thinking) <= time.time_ns()
    finally:
        for child in (gateway, worker):
            child.terminate()
        for child in (gateway, worker):
            assert child.wait(timeout=10) == 0
        client.close()


def test_bench_relay_scaled_out_on_a_redis_cluster(tmp_path: Path) -> None:
    data = _bench(
        tmp_path,
        "relay",
        *("--clients", "4", "--chunks", "5", "--bytes", "64", "--seconds", "2"),
        *("--gateways", "2", "--workers", "2", "--redis-cluster", "3", "--no-limit"),
    )
    assert (data["gateways"], data["workers"], data["redis_cluster_masters"]) == (2, 2, 3)
    assert data["errors"] == {}
    for key in (
        "chunks_per_s",
        "gateway_cpu_us_per_chunk",
        "worker_cpu_us_per_chunk",
        "redis_cpu_us_per_chunk",
        "gateway_rss_kb",
    ):
        value = data[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    assert data["cpu_ratio_to_limit"] is None  # no baseline measured


def test_bench_idle_smoke(tmp_path: Path) -> None:
    data = _bench(tmp_path, "idle", "--connections", "50")
    for key in IDLE_KEYS:
        value = data[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    assert data["opened"] == 50


def test_bench_chunks_carry_their_send_time() -> None:
    agent = BenchAgent(chunks=1, chunk_bytes=64)
    chunk = agent.chunk()
    assert len(chunk) == 64
    assert abs(chunk_sent_ns(chunk) - time.time_ns()) < 10**9
    # Shorter than the stamp: the stamp alone.
    assert chunk_sent_ns(BenchAgent(chunk_bytes=4).chunk()) > 0


def test_histogram_percentiles_and_merge() -> None:
    first, second = Histogram(), Histogram()
    for value in range(1, 1001):
        (first if value % 2 else second).add(float(value))
    first.merge(Histogram.from_json(orjson.loads(orjson.dumps(second.to_json()))))
    assert first.count == 1000
    assert first.max_us == 1000.0
    assert first.percentile(0.5) == pytest.approx(500, rel=0.01)
    assert first.percentile(0.99) == pytest.approx(990, rel=0.01)
    assert first.percentile(1.0) == pytest.approx(1000, rel=0.01)
    assert Histogram().percentile(0.5) is None
    empty = Histogram()
    empty.add(-5.0)
    assert empty.percentile(0.5) == 0.5
