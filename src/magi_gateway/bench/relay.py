"""``bench relay``: chunks/s, latencies and CPU per chunk, for the gateway and the baseline.

For each point (clients C, chunks K, bytes B): one bench worker streams K chunks
of B bytes per request; the gateway (then the ``limit`` baseline, against the same
worker and Redis) serves C closed-loop clients for a warm-up, then a measured
window of T seconds. CPU (utime + stime from /proc) of every process is read at
the start and the end of the window and divided by the chunks clients received
within it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magi_gateway.bench._harness import APPID, Harness, harness, signal_all, sleep_until, split, wait_files
from magi_gateway.bench._procs import BenchError, Child, all_cpu_us, cpu_us, host_cpu_ticks, rss_kb
from magi_gateway.bench._stats import Histogram
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


def _ms(value_us: float | None) -> float | None:
    return None if value_us is None else round(value_us / 1000, 3)


def _per(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


@dataclass(frozen=True)
class _Window:
    """What /proc said about the measured window."""

    t0_ns: int
    t1_ns: int
    #: CPU µs used within the window, by process role.
    cpu_us: dict[str, int]
    loadgen_cpu_us: int
    #: CPU µs of every other process, by command name (other jobs on the host).
    others_cpu_us: dict[str, int]
    host_busy_pct: float
    rss_kb: dict[str, int]
    loadavg_1m: float


def _run_window(
    h: Harness,
    point: RelayPoint,
    configs: list[LoadgenConfig],
    servers: Sequence[Child],
    workers: Sequence[Child],
    label: str,
) -> tuple[list[dict[str, Any]], _Window]:
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
    window = _Window(
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


def _summarize(results: list[dict[str, Any]], window: _Window) -> dict[str, Any]:
    """Merge the load generators' counts and histograms; relate them to the CPU used."""
    chunk_latency, request_latency, errors = Histogram(), Histogram(), Counter[str]()
    for result in results:
        chunk_latency.merge(Histogram.from_json(result["chunk_latency"]))
        request_latency.merge(Histogram.from_json(result["request_latency"]))
        errors.update(result["errors"])
    chunks = sum(int(r["chunks"]) for r in results)
    requests = sum(int(r["requests"]) for r in results)
    window_us = (window.t1_ns - window.t0_ns) / 1000
    measured: dict[str, Any] = {
        "chunks": chunks,
        "requests": requests,
        "chunks_per_s": round(chunks / (window_us / 1e6), 1),
        "requests_per_s": round(requests / (window_us / 1e6), 2),
        "chunk_latency_p50_ms": _ms(chunk_latency.percentile(0.50)),
        "chunk_latency_p99_ms": _ms(chunk_latency.percentile(0.99)),
        "chunk_latency_max_ms": _ms(chunk_latency.max_us if chunk_latency.count else None),
        "request_latency_p50_ms": _ms(request_latency.percentile(0.50)),
        "request_latency_p99_ms": _ms(request_latency.percentile(0.99)),
    }
    for name, used in window.cpu_us.items():
        measured[f"{name}_cpu_us_per_chunk"] = _per(used, chunks)
        measured[f"{name}_cpu_pct"] = round(100 * used / window_us, 1)
    measured["loadgen_cpu_us_per_chunk"] = _per(window.loadgen_cpu_us, chunks)
    measured["loadgen_cpu_pct"] = round(100 * window.loadgen_cpu_us / window_us, 1)
    measured["gateway_rss_kb"] = window.rss_kb["gateway"]
    measured["worker_rss_kb"] = window.rss_kb["worker"]
    measured["host_cpu_busy_pct"] = window.host_busy_pct
    # Whatever else ran meanwhile (other jobs on the host), in % of one core; the rest of
    # the host's busy time is the kernel's (softirq, mostly) or processes that exited.
    own_pct = 100 * (sum(window.cpu_us.values()) + window.loadgen_cpu_us) / window_us
    other_pct = 100 * sum(window.others_cpu_us.values()) / window_us
    busy_pct = window.host_busy_pct * (os.cpu_count() or 1)
    measured["other_cpu_pct"] = round(other_pct, 1)
    measured["other_cpu_top"] = {
        name: round(100 * used / window_us, 1) for name, used in list(window.others_cpu_us.items())[:3]
    }
    measured["unattributed_cpu_pct"] = round(max(busy_pct - own_pct - other_pct, 0.0), 1)
    measured["loadavg_1m"] = window.loadavg_1m
    measured["errors"] = dict(errors)
    return measured


def _measure(
    h: Harness,
    point: RelayPoint,
    urls: Sequence[str],
    servers: Sequence[Child],
    workers: Sequence[Child],
    label: str,
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
            name=f"lg{i}",
        )
        for i, count in enumerate(split(point.clients, max(point.loadgen_procs, len(urls))))
    ]
    results, window = _run_window(h, point, configs, servers, workers, label)
    return _summarize(results, window)


def _point_result(
    point: RelayPoint,
    product: dict[str, Any],
    limit: dict[str, Any] | None,
    redis_max_connections: int | None,
    cluster_masters: int = 0,
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
    for key, value in (limit or {}).items():
        result[f"limit_{'chunks_delivered' if key == 'chunks' else key}"] = value
    gateway, baseline = result.get("gateway_cpu_us_per_chunk"), result.get("limit_gateway_cpu_us_per_chunk")
    result["cpu_ratio_to_limit"] = round(gateway / baseline, 2) if gateway and baseline else None
    return result


def run_relay(
    points: Sequence[RelayPoint],
    *,
    limit: bool = True,
    workdir: Path | None = None,
    keep: bool = False,
    redis_max_connections: int | None = None,
    cluster_masters: int = 0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every point (gateway, then baseline); one result dict per point.

    ``redis_max_connections`` sets the gateway's and the worker's Redis pool size
    (through ``REDIS_URL``); None leaves redis-py's default.
    """
    results: list[dict[str, Any]] = []
    concurrency = max(p.clients for p in points) + _EXTRA_FRAMES
    with harness(
        workdir, keep=keep, redis_max_connections=redis_max_connections, cluster_masters=cluster_masters
    ) as h:
        progress(f"work dir {h.workdir}")
        by_agent = itertools.groupby(points, key=lambda p: (p.chunks, p.chunk_bytes, p.delay_s, p.workers))
        for run, ((chunks, chunk_bytes, delay_s, worker_count), group) in enumerate(by_agent):
            workers = [
                h.start_worker(
                    f"worker-{run}-{i}",
                    chunks=chunks,
                    chunk_bytes=chunk_bytes,
                    delay_s=delay_s,
                    concurrency=concurrency,
                )
                for i in range(worker_count)
            ]
            for index, point in enumerate(group):
                label = f"p{run}-{index}"
                what = f"C={point.clients} K={point.chunks} B={point.chunk_bytes} T={point.seconds:g}s"
                progress(f"gateway  {what}")
                started = [
                    h.start_gateway(
                        f"{label}-gateway-{i}",
                        max_messages_per_s=1_000_000,
                        message_burst=1_000_000,
                        max_connections_per_app=max(1000, 2 * point.clients),
                        max_outbound_messages=max(1024, 4 * (point.chunks + _EXTRA_FRAMES)),
                    )
                    for i in range(point.gateways)
                ]
                gateways = [child for child, _port in started]
                urls = [f"ws://127.0.0.1:{port}/ws" for _child, port in started]
                try:
                    product = _measure(h, point, urls, gateways, workers, label)
                finally:
                    for gateway in gateways:
                        h.children.stop(gateway)
                baseline = None
                if limit:
                    progress(f"limit    {what}")
                    server, port = h.start_limit(f"{label}-limit")
                    try:
                        baseline = _measure(
                            h, point, [f"ws://127.0.0.1:{port}/"], [server], workers, label + "L"
                        )
                    finally:
                        h.children.stop(server)
                results.append(
                    _point_result(point, product, baseline, redis_max_connections, cluster_masters)
                )
                if product["errors"] or (baseline and baseline["errors"]):
                    h.keep = True
                    progress(f"errors seen: logs kept in {h.workdir}")
            for worker in workers:
                h.children.stop(worker)
    return results
