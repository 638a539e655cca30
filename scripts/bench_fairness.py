"""Tenant fairness: appB's judgement latency, alone and under appA's flood (issue #12 item 3).

Real processes on 127.0.0.1: a Redis server, one ``magi-gateway serve`` and one worker
(``agent bench``: CHUNKS chunks DELAY_S apart, about 0.6 s per judgement, concurrency
CONCURRENCY). appB runs SAMPLES judgements one after the other, first alone, then while
FLOOD_CONNECTIONS connections of appA each open FLOOD_RATE judgements per second
(open loop: they do not wait for answers; 60/s, over twice what the worker serves),
starting ``--head-start-s`` before appB's first. Prints one
JSON object: the latencies (s) and the loaded/unloaded ratio of their medians.

    PYTHONPATH=src python scripts/bench_fairness.py [--head-start-s 8] [--wait-s 120]

Session limits are off (``MAX_SESSIONS_PER_APP=0``, ``MAX_SESSIONS_PER_S_PER_APP=0``) so
that the scheduling alone is measured, not the quotas that would refuse appA's flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import websockets

from magi_gateway.bench._procs import Children, python_module, wait_http_ok
from magi_gateway.core.auth import compute_token, minute_of
from magi_gateway.embedded import RedisServer, free_port

SECRET = "fairness-secret"  # noqa: S105  (a throwaway Redis and gateway)
CHUNKS, DELAY_S, CONCURRENCY = 10, 0.06, 16
FLOOD_CONNECTIONS, FLOOD_RATE = 3, 20.0
SAMPLES = 8


async def connect(port: int, appid: str) -> websockets.ClientConnection:
    token = compute_token(appid, SECRET, minute_of(time.time()))
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?appid={appid}&token={token}", max_size=None)
    hello = orjson.loads(await ws.recv())
    assert hello["type"] == "connection_established", hello
    return ws


def judgement(text: str) -> str:
    return orjson.dumps(
        {"type": "agent_judgement", "agent_ids": ["bench"], "data": {"user_input": text}}
    ).decode()


async def timed_judgement(ws: websockets.ClientConnection, wait_s: float = 120) -> float:
    started = time.monotonic()
    await ws.send(judgement("appB asks"))
    while True:
        message = orjson.loads(await asyncio.wait_for(ws.recv(), wait_s))
        if "error" in message:
            raise RuntimeError(message)
        if message["type"] == "agent_judgement_complete":
            return time.monotonic() - started


async def flood(port: int, stop: asyncio.Event, sent: list[int]) -> None:
    ws = await connect(port, "appA")

    async def drain() -> None:
        async for _ in ws:
            pass

    reader = asyncio.create_task(drain())
    try:
        while not stop.is_set():
            await ws.send(judgement("appA floods"))
            sent.append(1)
            await asyncio.sleep(1 / FLOOD_RATE)
    finally:
        await ws.close()
        reader.cancel()


async def measure(port: int, head_start_s: float, wait_s: float) -> dict[str, object]:
    ws = await connect(port, "appB")
    await timed_judgement(ws)  # warm-up
    alone = [await timed_judgement(ws) for _ in range(SAMPLES)]
    stop, sent = asyncio.Event(), []
    flooders = [asyncio.create_task(flood(port, stop, sent)) for _ in range(FLOOD_CONNECTIONS)]
    await asyncio.sleep(head_start_s)  # let appA's backlog build up
    loaded: list[float] = []
    try:
        for _ in range(SAMPLES):
            loaded.append(await timed_judgement(ws, wait_s))
    except TimeoutError:
        stop.set()
        await asyncio.gather(*flooders)
        return {
            "appB_alone_s": [round(x, 3) for x in alone],
            "appB_alone_p50_s": round(statistics.median(alone), 3),
            "appB_under_flood_s": [round(x, 3) for x in loaded],
            "appB_under_flood_timed_out_after_s": wait_s,
            "appA_judgements_sent": len(sent),
        }
    stop.set()
    await asyncio.gather(*flooders)
    await ws.close()
    return {
        "appB_alone_s": [round(x, 3) for x in alone],
        "appB_under_flood_s": [round(x, 3) for x in loaded],
        "appB_alone_p50_s": round(statistics.median(alone), 3),
        "appB_under_flood_p50_s": round(statistics.median(loaded), 3),
        "appB_under_flood_max_s": round(max(loaded), 3),
        "ratio_p50": round(statistics.median(loaded) / statistics.median(alone), 2),
        "appA_judgements_sent": len(sent),
        "appA_rate_per_s": FLOOD_CONNECTIONS * FLOOD_RATE,
        "worker_capacity_per_s": round(CONCURRENCY / (CHUNKS * DELAY_S), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-start-s", type=float, default=8.0, help="appA floods alone this long first")
    parser.add_argument("--wait-s", type=float, default=120.0, help="longest wait for one appB judgement")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis", persistence=False)
        redis.start()
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": redis.url,
            "FIXED_SECRET": SECRET,
            "MAX_MESSAGES_PER_S": "1000",
            "MESSAGE_BURST": "1000",
            "MAX_SESSIONS_PER_APP": "0",
            "MAX_SESSIONS_PER_S_PER_APP": "0",
            "JUDGEMENT_TIMEOUT_S": "300",
        }
        try:
            with Children(workdir) as children:
                gateway = children.start(
                    "gateway",
                    python_module("magi_gateway", "serve", "--host", "127.0.0.1", "--port", str(port)),
                    env,
                )
                worker = children.start(
                    "worker",
                    python_module(
                        "magi_gateway",
                        "agent",
                        "bench",
                        "--chunks",
                        str(CHUNKS),
                        "--delay",
                        str(DELAY_S),
                        "--concurrency",
                        str(CONCURRENCY),
                    ),
                    env,
                )
                wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout_s=20, watch=[gateway, worker])
                time.sleep(1.0)  # the worker's first heartbeat
                print(json.dumps(asyncio.run(measure(port, options.head_start_s, options.wait_s)), indent=2))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
