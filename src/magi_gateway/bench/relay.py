"""``bench relay``: chunks/s, latencies and CPU per chunk, for the gateway and the baseline.

For each point (clients C, chunks K, bytes B): the product's bench workers stream K
chunks of B bytes per request and its gateways serve C closed-loop clients for a
warm-up, then a measured window of T seconds; both are stopped, Redis is emptied, and
the ``limit`` baseline (its own gateways and workers, sharing no code with the product:
``bench.limit``, ``bench.limit_worker``) is measured the same way on the same Redis.
CPU (utime + stime from /proc) of every process is read at the start and the end of
the window, summed by role (gateway, worker, Redis) and divided by the chunks clients
received within it; each figure is also given as a ratio of product to baseline.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magi_gateway.bench._figures import Window, add_ratios, summarize
from magi_gateway.bench._harness import APPID, Harness, harness, signal_all, sleep_until, split, wait_files
from magi_gateway.bench._procs import BenchError, Child, all_cpu_us, cpu_us, host_cpu_ticks, rss_kb
from magi_gateway.bench.loadgen import LoadgenConfig

__all__ = ["RelayPoint", "run_relay"]

#: Frames beyond the K chunks: accepted, final, complete, and some slack.
_EXTRA_FRAMES = 16
_REQUEST_TIMEOUT_S = 60.0
#: Client starts are spread over this long (at most the warm-up).
_STAGGER_S = 1.0


@dataclass(frozen=True)
class RelayPoint:
    """One measurement's parameters."""

    clients: int
    chunks: int
    chunk_bytes: int
    seconds: float
    warmup_s: float
    delay_s: float = 0.0
    deflate: bool = False
    loadgen_procs: int = 1
    #: Gateway processes sharing the load (clients spread over them), and bench workers.
    gateways: int = 1
    workers: int = 1


def _run_window(
    h: Harness,
    point: RelayPoint,
    configs: list[LoadgenConfig],
    servers: Sequence[Child],
    workers: Sequence[Child],
    label: str,
) -> tuple[list[dict[str, Any]], Window]:
    """Start the load generators, run warm-up and window, collect their results.

    With several gateways or workers, a role's CPU and RSS are their sums.
    """
    loadgens = h.start_loadgens(f"{label}-loadgen", configs)
    watch = [*servers, *workers, *loadgens]
    pids = {
        "gateway": [server.pid for server in servers],
        "worker": [worker.pid for worker in workers],
        "redis": h.redis_pids,
    }
    try:
        ready = wait_files(configs, "ready", timeout_s=60 + point.clients / 20, watch=watch)
        connected = sum(int(r["connected"]) for r in ready)
        if connected < point.clients:
            raise BenchError(f"only {connected} of {point.clients} clients connected to {label}")
        t0_ns = time.time_ns() + int(point.warmup_s * 1e9)
        t1_ns = t0_ns + int(point.seconds * 1e9)
        signal_all(configs, "go", {"t0_ns": t0_ns, "t1_ns": t1_ns})
        loadavg = os.getloadavg()[0]
        sleep_until(t0_ns, watch)
        cpu0 = {name: sum(cpu_us(pid) for pid in group) for name, group in pids.items()}
        lg0 = sum(cpu_us(lg.pid) for lg in loadgens)
        host0, all0 = host_cpu_ticks(), all_cpu_us()
        sleep_until(t1_ns, watch)
        cpu1 = {name: sum(cpu_us(pid) for pid in group) for name, group in pids.items()}
        lg1 = sum(cpu_us(lg.pid) for lg in loadgens)
        host1, all1 = host_cpu_ticks(), all_cpu_us()
        rss = {name: sum(rss_kb(pid) for pid in group) for name, group in pids.items() if name != "redis"}
        results = wait_files(
            configs,
            "result",
            timeout_s=_REQUEST_TIMEOUT_S + 30,
            watch=[*servers, *workers],
            writers=loadgens,
        )
    finally:
        for loadgen in loadgens:
            h.children.stop(loadgen)
    ours = {*(pid for group in pids.values() for pid in group), *(lg.pid for lg in loadgens), os.getpid()}
    others: Counter[str] = Counter()
    for pid, (name, used) in all1.items():
        if pid not in ours:
            others[name] += used - all0.get(pid, (name, 0))[1]
    window = Window(
        t0_ns=t0_ns,
        t1_ns=t1_ns,
        cpu_us={name: cpu1[name] - cpu0[name] for name in pids},
        loadgen_cpu_us=lg1 - lg0,
        others_cpu_us={name: used for name, used in others.most_common() if used > 0},
        host_busy_pct=round(100 * (host1[0] - host0[0]) / max(host1[1] - host0[1], 1), 1),
        rss_kb=rss,
        loadavg_1m=round(loadavg, 2),
    )
    return results, window


def _measure(
    h: Harness,
    point: RelayPoint,
    urls: Sequence[str],
    servers: Sequence[Child],
    workers: Sequence[Child],
    label: str,
    transport: str = "ws",
) -> dict[str, Any]:
    """Drive ``point``'s load against ``urls`` (clients spread over them); measure the window."""
    configs = [
        LoadgenConfig(
            mode="relay",
            url=urls[i % len(urls)],
            appid=APPID,
            secret=h.secret,
            clients=count,
            directory=str(h.loadgen_dir(f"{label}-lg{i}")),
            max_frames_per_request=point.chunks + _EXTRA_FRAMES,
            deflate=point.deflate,
            request_timeout_s=_REQUEST_TIMEOUT_S,
            stagger_s=min(point.warmup_s, _STAGGER_S),
            transport=transport,
            name=f"lg{i}",
        )
        for i, count in enumerate(split(point.clients, max(point.loadgen_procs, len(urls))))
    ]
    results, window = _run_window(h, point, configs, servers, workers, label)
    return summarize(results, window)


def _point_result(
    point: RelayPoint,
    product: dict[str, Any],
    limit: dict[str, Any] | None,
    redis_max_connections: int | None,
    cluster_masters: int = 0,
    sse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "clients": point.clients,
        "chunks": point.chunks,
        "bytes": point.chunk_bytes,
        "seconds": point.seconds,
        "warmup_s": point.warmup_s,
        "delay_s": point.delay_s,
        "deflate": point.deflate,
        "loadgen_procs": point.loadgen_procs,
        "gateways": point.gateways,
        "workers": point.workers,
        "redis_max_connections": redis_max_connections,
        "redis_cluster_masters": cluster_masters,
    }
    result.update({("chunks_delivered" if k == "chunks" else k): v for k, v in product.items()})
    for prefix, side in (("limit", limit), ("sse", sse)):
        for key, value in (side or {}).items():
            result[f"{prefix}_{'chunks_delivered' if key == 'chunks' else key}"] = value
    add_ratios(result)
    return result


def _run_side(
    h: Harness,
    point: RelayPoint,
    label: str,
    start_worker: Callable[[str], Child],
    start_gateway: Callable[[str], tuple[Child, str]],
    transport: str = "ws",
) -> dict[str, Any]:
    """Empty Redis, start ``point.workers`` workers and ``point.gateways`` gateways, measure, stop them.

    Each side (product, baseline) runs alone: neither's processes see the other's load.
    """
    h.flush_redis()
    started: list[Child] = []
    try:
        workers = [start_worker(f"{label}-worker-{i}") for i in range(point.workers)]
        started += workers
        gateways, urls = [], []
        for i in range(point.gateways):
            gateway, url = start_gateway(f"{label}-gateway-{i}")
            gateways.append(gateway)
            started.append(gateway)
            urls.append(url)
        return _measure(h, point, urls, gateways, workers, label, transport)
    finally:
        for child in reversed(started):
            h.children.stop(child)


def _run_product(
    h: Harness, point: RelayPoint, label: str, concurrency: int, transport: str = "ws"
) -> dict[str, Any]:
    """The product: ``magi-gateway agent bench`` workers and ``magi-gateway serve`` gateways.

    ``transport`` "sse": the clients ask over HTTP (``POST /v1/judgements``, event stream).
    """

    def worker(name: str) -> Child:
        return h.start_worker(
            name,
            chunks=point.chunks,
            chunk_bytes=point.chunk_bytes,
            delay_s=point.delay_s,
            concurrency=concurrency,
        )

    def gateway(name: str) -> tuple[Child, str]:
        child, port = h.start_gateway(
            name,
            max_messages_per_s=1_000_000,
            message_burst=1_000_000,
            max_connections_per_app=max(1000, 2 * point.clients),
            max_sessions_per_app=0,
            max_sessions_per_s_per_app=0,
            max_outbound_messages=max(1024, 4 * (point.chunks + _EXTRA_FRAMES)),
            max_outbound_bytes=max(4 << 20, 4 * (point.chunks + _EXTRA_FRAMES) * (point.chunk_bytes + 256)),
        )
        return child, f"ws://127.0.0.1:{port}/ws" if transport == "ws" else f"http://127.0.0.1:{port}"

    return _run_side(h, point, label, worker, gateway, transport)


def _run_limit(h: Harness, point: RelayPoint, label: str) -> dict[str, Any]:
    """The baseline: as many limit workers and limit gateways as the product had."""

    def worker(name: str) -> Child:
        return h.start_limit_worker(
            name, chunks=point.chunks, chunk_bytes=point.chunk_bytes, delay_s=point.delay_s
        )

    def gateway(name: str) -> tuple[Child, str]:
        child, port = h.start_limit(name)
        return child, f"ws://127.0.0.1:{port}/"

    return _run_side(h, point, label, worker, gateway)


def run_relay(
    points: Sequence[RelayPoint],
    *,
    limit: bool = True,
    sse: bool = False,
    workdir: Path | None = None,
    keep: bool = False,
    redis_max_connections: int | None = None,
    cluster_masters: int = 0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every point (product, then baseline); one result dict per point.

    ``sse``: also measure the product with its clients on the HTTP/SSE API (``sse_*`` keys).

    ``redis_max_connections`` sets the gateway's and the worker's Redis pool size
    (through ``REDIS_URL``); None leaves redis-py's default.
    """
    results: list[dict[str, Any]] = []
    concurrency = max(p.clients for p in points) + _EXTRA_FRAMES
    with harness(
        workdir, keep=keep, redis_max_connections=redis_max_connections, cluster_masters=cluster_masters
    ) as h:
        progress(f"work dir {h.workdir}")
        for index, point in enumerate(points):
            label = f"p{index}"
            what = f"C={point.clients} K={point.chunks} B={point.chunk_bytes} T={point.seconds:g}s"
            progress(f"gateway  {what}")
            product = _run_product(h, point, label, concurrency)
            baseline = None
            if limit:
                progress(f"limit    {what}")
                baseline = _run_limit(h, point, label + "L")
            over_http = None
            if sse:
                progress(f"SSE      {what}")
                over_http = _run_product(h, point, label + "S", concurrency, "sse")
            results.append(
                _point_result(point, product, baseline, redis_max_connections, cluster_masters, over_http)
            )
            if any(side and side["errors"] for side in (product, baseline, over_http)):
                h.keep = True
                progress(f"errors seen: logs kept in {h.workdir}")
    return results
