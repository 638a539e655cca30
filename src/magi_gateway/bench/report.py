"""Benchmark output: rich tables, the JSON file and the PNG plot (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from magi_gateway.bench._procs import BenchError

__all__ = ["idle_plot", "idle_table", "relay_plot", "relay_table", "write_report"]

# (label, key without the limit_ prefix, format)
_RELAY_ROWS = [
    ("chunks/s", "chunks_per_s", "{:,.0f}"),
    ("requests/s", "requests_per_s", "{:,.1f}"),
    ("chunk latency p50 (ms)", "chunk_latency_p50_ms", "{:.2f}"),
    ("chunk latency p99 (ms)", "chunk_latency_p99_ms", "{:.2f}"),
    ("request latency p50 (ms)", "request_latency_p50_ms", "{:.1f}"),
    ("request latency p99 (ms)", "request_latency_p99_ms", "{:.1f}"),
    ("relay CPU µs/chunk", "gateway_cpu_us_per_chunk", "{:.1f}"),
    ("relay CPU %", "gateway_cpu_pct", "{:.0f}"),
    ("worker CPU µs/chunk", "worker_cpu_us_per_chunk", "{:.1f}"),
    ("redis CPU µs/chunk", "redis_cpu_us_per_chunk", "{:.1f}"),
    ("load generator CPU %", "loadgen_cpu_pct", "{:.0f}"),
    ("relay RSS (KiB)", "gateway_rss_kb", "{:,}"),
    ("host CPU busy % (all cores)", "host_cpu_busy_pct", "{:.0f}"),
    ("other processes' CPU %", "other_cpu_pct", "{:.0f}"),
    ("unattributed CPU % (kernel)", "unattributed_cpu_pct", "{:.0f}"),
    ("load average (1 min)", "loadavg_1m", "{:.2f}"),
    ("errors", "errors", "{}"),
]

# (label, key) of the product-to-baseline ratios under the single-point table
_RATIO_CAPTION = [
    ("chunks/s", "chunks_per_s_ratio_to_limit"),
    ("relay CPU/chunk", "cpu_ratio_to_limit"),
    ("worker CPU/chunk", "worker_cpu_ratio_to_limit"),
    ("redis CPU/chunk", "redis_cpu_ratio_to_limit"),
]


def _fmt(value: Any, pattern: str = "{}") -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "0"
    return pattern.format(value)


def relay_table(results: Sequence[dict[str, Any]]) -> Table:
    """One point: metric rows, gateway and baseline columns. Several: one row per point."""
    if len(results) == 1:
        r = results[0]
        title = (
            f"relay: {r['clients']} clients, {r['chunks']} chunks x {r['bytes']} B, "
            f"{r['seconds']:g} s (warm-up {r['warmup_s']:g} s, delay {r['delay_s']:g} s)"
        )
        if r.get("gateways", 1) > 1 or r.get("workers", 1) > 1:
            title += f"; {r['gateways']} gateways, {r['workers']} workers (CPU and RSS summed)"
        if r.get("redis_cluster_masters"):
            title += f"; Redis Cluster of {r['redis_cluster_masters']} masters"
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("gateway", justify="right")
        table.add_column("limit", justify="right")
        over_http = "sse_chunks_per_s" in r
        if over_http:
            table.add_column("gateway SSE", justify="right")
        for label, key, pattern in _RELAY_ROWS:
            cells = [_fmt(r.get(key), pattern), _fmt(r.get(f"limit_{key}"), pattern)]
            if over_http:
                cells.append(_fmt(r.get(f"sse_{key}"), pattern))
            table.add_row(label, *cells)
        table.caption = "gateway / limit: " + ", ".join(
            f"{label} {_fmt(r.get(key), '{:.2f}')}" for label, key in _RATIO_CAPTION
        )
        return table
    table = Table(title="relay sweep (latencies in ms, CPU in µs per chunk)")
    for column in (
        "C",
        "B",
        "chunks/s",
        "p50",
        "p99",
        "req p99",
        "CPU",
        "limit chunks/s",
        "limit p99",
        "limit CPU",
        "ratio",
        "load",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["clients"]),
            str(r["bytes"]),
            _fmt(r.get("chunks_per_s"), "{:,.0f}"),
            _fmt(r.get("chunk_latency_p50_ms"), "{:.2f}"),
            _fmt(r.get("chunk_latency_p99_ms"), "{:.2f}"),
            _fmt(r.get("request_latency_p99_ms"), "{:.1f}"),
            _fmt(r.get("gateway_cpu_us_per_chunk"), "{:.1f}"),
            _fmt(r.get("limit_chunks_per_s"), "{:,.0f}"),
            _fmt(r.get("limit_chunk_latency_p99_ms"), "{:.2f}"),
            _fmt(r.get("limit_gateway_cpu_us_per_chunk"), "{:.1f}"),
            _fmt(r.get("cpu_ratio_to_limit"), "{:.2f}"),
            _fmt(r.get("loadavg_1m"), "{:.2f}"),
        )
    return table


def idle_table(result: dict[str, Any]) -> Table:
    """The idle benchmark's figures."""
    table = Table(title=f"idle: {result['connections']} connections")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("connections opened", "opened", "{:,}"),
        ("still open at stop", "open_at_stop", "{:,}"),
        ("handshakes/s", "handshakes_per_s", "{:,.0f}"),
        ("gateway CPU µs/handshake", "gateway_cpu_us_per_handshake", "{:,.0f}"),
        ("gateway CPU % while opening", "gateway_cpu_pct", "{:.0f}"),
        ("load generator CPU % while opening", "loadgen_cpu_pct", "{:.0f}"),
        ("other processes' CPU % while opening", "other_cpu_pct", "{:.0f}"),
        ("load average (1 min)", "loadavg_1m", "{:.2f}"),
        ("gateway RSS before (KiB)", "rss_before_kb", "{:,}"),
        ("gateway RSS with all open (KiB)", "rss_after_kb", "{:,}"),
        ("gateway RSS after closing (KiB)", "rss_after_close_kb", "{:,}"),
        ("RSS per connection (KiB)", "rss_kb_per_connection", "{:.1f}"),
        ("errors", "errors", "{}"),
    ]
    for label, key, pattern in rows:
        table.add_row(label, _fmt(result.get(key), pattern))
    return table


def write_report(path: Path, data: dict[str, Any]) -> None:
    """Write the JSON report."""
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError(
            "--plot needs matplotlib: pip install 'magi-gateway[bench]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _relay_bars(plt: Any, r: dict[str, Any], path: Path) -> None:
    panels = [
        ("chunks/s", "chunks_per_s"),
        ("chunk latency p99 (ms)", "chunk_latency_p99_ms"),
        ("relay CPU µs/chunk", "gateway_cpu_us_per_chunk"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4))
    for ax, (label, key) in zip(axes, panels, strict=True):
        values = [r.get(key) or 0, r.get(f"limit_{key}") or 0]
        ax.bar(["gateway", "limit"], values, color=["tab:blue", "tab:gray"])
        ax.set_title(label)
    fig.suptitle(f"relay: {r['clients']} clients, {r['chunks']} chunks x {r['bytes']} B")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def relay_plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Throughput, p99 chunk latency and CPU per chunk against load (gateway solid, limit dashed)."""
    plt = _pyplot()
    if len(results) == 1:
        _relay_bars(plt, results[0], path)
        return
    x_key, series_key = ("clients", "bytes")
    if len({r["clients"] for r in results}) == 1:
        x_key, series_key = ("bytes", "clients")
    panels = [
        ("chunks/s", "chunks_per_s"),
        ("chunk latency p99 (ms)", "chunk_latency_p99_ms"),
        ("relay CPU µs/chunk", "gateway_cpu_us_per_chunk"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for series in sorted({r[series_key] for r in results}):
        rows = sorted((r for r in results if r[series_key] == series), key=lambda r: r[x_key])
        xs = [r[x_key] for r in rows]
        for ax, (_label, key) in zip(axes, panels, strict=True):
            (line,) = ax.plot(
                xs, [r.get(key) for r in rows], marker="o", label=f"gateway {series_key}={series}"
            )
            ax.plot(
                xs,
                [r.get(f"limit_{key}") for r in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"limit {series_key}={series}",
            )
    ticks = sorted({r[x_key] for r in results})
    for ax, (label, key) in zip(axes, panels, strict=True):
        if key != "chunks_per_s":
            ax.set_yscale("log")  # an overloaded point would flatten the others
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(x_key)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("relay: gateway (solid) vs limit baseline (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def idle_plot(result: dict[str, Any], path: Path) -> None:
    """Gateway RSS over the run: connections opening, held idle, closed."""
    plt = _pyplot()
    samples = result.get("rss_samples") or []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([t for t, _ in samples], [kb / 1024 for _, kb in samples], marker=".")
    ax.axhline(result["rss_before_kb"] / 1024, linestyle="--", color="gray", label="before")
    ax.set_xlabel("seconds since the first connection attempt")
    ax.set_ylabel("gateway RSS (MiB)")
    ax.set_title(
        f"idle: {result['opened']:,} connections, {_fmt(result.get('rss_kb_per_connection'), '{:.1f}')} "
        f"KiB each, {_fmt(result.get('handshakes_per_s'), '{:,.0f}')} handshakes/s"
    )
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
