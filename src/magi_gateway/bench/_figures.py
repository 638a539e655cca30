"""``bench relay``'s figures: the load generators' counts and /proc's CPU, per chunk and as ratios."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from magi_gateway.bench._stats import Histogram

__all__ = ["RATIOS", "Window", "add_ratios", "summarize"]

#: (ratio key, figure divided by the baseline's): product / baseline, measured in the same run.
RATIOS = [
    ("cpu_ratio_to_limit", "gateway_cpu_us_per_chunk"),
    ("chunks_per_s_ratio_to_limit", "chunks_per_s"),
    ("worker_cpu_ratio_to_limit", "worker_cpu_us_per_chunk"),
    ("redis_cpu_ratio_to_limit", "redis_cpu_us_per_chunk"),
    ("chunk_latency_p50_ratio_to_limit", "chunk_latency_p50_ms"),
    ("chunk_latency_p99_ratio_to_limit", "chunk_latency_p99_ms"),
]


def _ms(value_us: float | None) -> float | None:
    return None if value_us is None else round(value_us / 1000, 3)


def _per(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


@dataclass(frozen=True)
class Window:
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


def summarize(results: list[dict[str, Any]], window: Window) -> dict[str, Any]:
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


def add_ratios(result: dict[str, Any]) -> None:
    """Add every ``RATIOS`` key to ``result``: product figure / baseline's (None without both)."""
    for name, key in RATIOS:
        ours, baseline = result.get(key), result.get(f"limit_{key}")
        result[name] = round(ours / baseline, 2) if ours and baseline else None
