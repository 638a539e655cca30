"""``bench idle``: gateway memory per idle authenticated connection, and handshakes/s.

One gateway process; after one warm-up connection (so lazily loaded code is not
counted) its RSS is read, then load generator processes open N connections,
``concurrency`` at a time each, every one authenticated and greeted with
``connection_established``. Handshakes/s is N over the time from the first
connection attempt to the last greeting; RSS per connection is the RSS growth
over N once all are open and idle.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.sync.client import connect

from magi_gateway.bench._harness import APPID, harness, signal_all, split, wait_files
from magi_gateway.bench._procs import (
    BenchError,
    Child,
    all_cpu_us,
    cpu_us,
    raise_open_files_limit,
    rss_kb,
    wait_for,
)
from magi_gateway.bench.loadgen import LoadgenConfig
from magi_gateway.core.auth import compute_token, minute_of

__all__ = ["run_idle"]

_SETTLE_S = 1.0
_SAMPLE_S = 0.1


def _warm_up(url: str, secret: str) -> None:
    token = compute_token(APPID, secret, minute_of(time.time()))
    with connect(f"{url}?{urlencode({'appid': APPID, 'token': token})}", proxy=None, compression=None) as ws:
        hello = orjson.loads(ws.recv())
        if hello.get("type") != "connection_established":
            raise BenchError(f"warm-up connection refused: {hello}")


def _sample_while(
    done: Callable[[], bool], gateway: Child, samples: list[tuple[float, int]], start: float, **kw: Any
) -> None:
    last = 0.0

    def check() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last >= _SAMPLE_S:
            samples.append((round(now - start, 3), rss_kb(gateway.pid)))
            last = now
        return done()

    wait_for(check, **kw)


def run_idle(
    connections: int,
    *,
    concurrency: int = 200,
    loadgen_procs: int | None = None,
    deflate: bool = False,
    workdir: Path | None = None,
    keep: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Open ``connections`` idle connections to one gateway and measure it."""
    limit = raise_open_files_limit(connections + 1024)
    if limit < connections + 64:
        progress(f"warning: open files limit {limit} may be too low for {connections} connections")
    procs = loadgen_procs or (1 if connections <= 2000 else 2)
    with harness(workdir, keep=keep) as h:
        progress(f"work dir {h.workdir}")
        gateway, port = h.start_gateway(
            "idle-gateway",
            max_connections_per_app=connections + 100,
            max_connections=connections + 100,
            max_messages_per_s=1_000_000,
            message_burst=1_000_000,
        )
        url = f"ws://127.0.0.1:{port}/ws"
        _warm_up(url, h.secret)
        time.sleep(_SETTLE_S)
        rss_before = rss_kb(gateway.pid)
        loadavg = os.getloadavg()[0]
        configs = [
            LoadgenConfig(
                mode="idle",
                url=url,
                appid=APPID,
                secret=h.secret,
                clients=count,
                directory=str(h.loadgen_dir(f"idle-lg{i}")),
                deflate=deflate,
                concurrency=concurrency,
                open_timeout_s=60.0,
                name=f"lg{i}",
            )
            for i, count in enumerate(split(connections, procs))
        ]
        loadgens = h.start_loadgens("idle-loadgen", configs)
        watch = [gateway, *loadgens]
        wait_files(configs, "ready", timeout_s=60, watch=watch)
        progress(f"opening {connections} connections from {len(configs)} process(es)")
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        cpu0 = cpu_us(gateway.pid)
        lg0 = sum(cpu_us(lg.pid) for lg in loadgens)
        all0 = all_cpu_us()
        signal_all(configs, "go", {})
        paths = [c.path("result") for c in configs]
        _sample_while(
            lambda: all(p.exists() for p in paths),
            gateway,
            samples,
            start,
            timeout_s=120 + connections / 20,
            what="the connections to open",
            watch=watch,
        )
        cpu1 = cpu_us(gateway.pid)
        lg1 = sum(cpu_us(lg.pid) for lg in loadgens)
        all1 = all_cpu_us()
        ours = {gateway.pid, *h.redis_pids, os.getpid(), *(lg.pid for lg in loadgens)}
        others_us = sum(
            used - all0.get(pid, ("", 0))[1] for pid, (_, used) in all1.items() if pid not in ours
        )
        results = [orjson.loads(p.read_bytes()) for p in paths]
        opened = sum(int(r["opened"]) for r in results)
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result["errors"])
        first_ns = min(int(r["start_ns"]) for r in results)
        last_ns = max(int(r["last_ns"]) for r in results)
        if errors:
            h.keep = True
        settle_until = time.monotonic() + _SETTLE_S
        _sample_while(
            lambda: time.monotonic() > settle_until, gateway, samples, start, timeout_s=10, what="settling"
        )
        rss_after = rss_kb(gateway.pid)
        signal_all(configs, "stop", {})
        closed = wait_files(
            configs, "closed", timeout_s=120 + connections / 50, watch=[gateway], writers=loadgens
        )
        still_open = sum(int(c["open_at_stop"]) for c in closed)
        for loadgen in loadgens:
            h.children.stop(loadgen)
        settle_until = time.monotonic() + _SETTLE_S
        _sample_while(
            lambda: time.monotonic() > settle_until, gateway, samples, start, timeout_s=10, what="settling"
        )
        rss_after_close = rss_kb(gateway.pid)
    wall_s = (last_ns - first_ns) / 1e9
    wall_ms = wall_s * 1000
    return {
        "benchmark": "idle",
        "connections": connections,
        "opened": opened,
        "open_at_stop": still_open,
        "concurrency": concurrency,
        "loadgen_procs": len(configs),
        "deflate": deflate,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_after_close_kb": rss_after_close,
        "rss_kb_per_connection": round((rss_after - rss_before) / opened, 2) if opened else None,
        "handshakes_per_s": round(opened / wall_s, 1) if wall_s > 0 else None,
        "handshake_wall_s": round(wall_s, 3),
        "gateway_cpu_us_per_handshake": round((cpu1 - cpu0) / opened, 1) if opened else None,
        "gateway_cpu_pct": round(100 * (cpu1 - cpu0) / 1000 / wall_ms, 1) if wall_ms > 0 else None,
        "loadgen_cpu_pct": round(100 * (lg1 - lg0) / 1000 / wall_ms, 1) if wall_ms > 0 else None,
        # Other jobs on the host while the connections opened, in % of one core.
        "other_cpu_pct": round(100 * others_us / 1000 / wall_ms, 1) if wall_ms > 0 else None,
        "loadavg_1m": round(loadavg, 2),
        "errors": dict(errors),
        "rss_samples": samples,
    }
