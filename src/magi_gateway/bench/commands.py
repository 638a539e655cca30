"""``magi-gateway bench relay`` and ``magi-gateway bench idle``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from magi_gateway.bench._procs import BenchError, machine_info
from magi_gateway.bench.idle import run_idle
from magi_gateway.bench.relay import RelayPoint, run_relay
from magi_gateway.bench.report import idle_plot, idle_table, relay_plot, relay_table, write_report

__all__ = ["SWEEP_BYTES", "SWEEP_CLIENTS", "app"]

app = typer.Typer(help="Benchmarks against real local processes (DESIGN §9).", no_args_is_help=True)
console = Console()

#: What ``--sweep`` varies when --clients / --bytes are not given.
SWEEP_CLIENTS = [10, 50, 100, 200, 500]
SWEEP_BYTES = [32, 256, 1024, 8192]

_JsonOption = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here")]
_PlotOption = Annotated[Path | None, typer.Option(help="Write a PNG plot here (needs matplotlib)")]
_WorkDirOption = Annotated[
    Path | None, typer.Option(help="Logs and coordination files (default: a temp dir, removed on success)")
]
_KeepOption = Annotated[bool, typer.Option(help="Keep the work dir even on success")]


def _int_list(text: str | None, default: list[int], name: str) -> list[int]:
    if text is None:
        return default
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{name}: a number or a comma-separated list of numbers") from exc
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name}: positive numbers")
    return values


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every child is stopped on the way out.
    raise SystemExit(128 + signum)


def _run(benchmark: str, body: Any) -> Any:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return body()
    except BenchError as exc:
        console.print(f"[red]bench {benchmark} failed:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc


@app.command()
def relay(
    clients: Annotated[
        str | None, typer.Option(help="Closed-loop clients; a list sweeps (10,100,1000)")
    ] = None,
    chunks: Annotated[int, typer.Option(min=1, help="Chunks per request (K)")] = 50,
    chunk_bytes: Annotated[
        str | None, typer.Option("--bytes", help="Bytes per chunk (B); a list sweeps (32,1024,8192)")
    ] = None,
    seconds: Annotated[float, typer.Option(min=0.1, help="Measured window (T)")] = 20.0,
    warmup: Annotated[float | None, typer.Option(help="Warm-up before the window [min(3, T/4)]")] = None,
    delay: Annotated[
        float, typer.Option(min=0, help="Seconds between chunks (to run below saturation)")
    ] = 0.0,
    sweep: Annotated[
        bool, typer.Option(help=f"Default lists: clients {SWEEP_CLIENTS}, bytes {SWEEP_BYTES}")
    ] = False,
    deflate: Annotated[bool, typer.Option(help="Clients offer permessage-deflate")] = False,
    limit: Annotated[bool, typer.Option(help="Also measure the limit baseline relay")] = True,
    sse: Annotated[
        bool, typer.Option(help="Also measure the product's HTTP/SSE API (POST /v1/judgements)")
    ] = False,
    loadgen_procs: Annotated[int, typer.Option(min=1, help="Load generator processes")] = 1,
    gateways: Annotated[int, typer.Option(min=1, help="Gateway processes (clients spread over them)")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Bench worker processes")] = 1,
    redis_cluster: Annotated[
        int, typer.Option(min=0, help="Run on a local Redis Cluster of N masters (0: one server)")
    ] = 0,
    redis_max_connections: Annotated[
        int | None,
        typer.Option(min=1, help="Redis pool size of gateway and worker (REDIS_URL ?max_connections=)"),
    ] = None,
    json_path: _JsonOption = None,
    plot: _PlotOption = None,
    work_dir: _WorkDirOption = None,
    keep: _KeepOption = False,
) -> None:
    """C clients in a closed loop, K chunks of B bytes per request: gateway vs limit baseline."""
    client_counts = _int_list(clients, SWEEP_CLIENTS if sweep else [100], "--clients")
    byte_counts = _int_list(chunk_bytes, SWEEP_BYTES if sweep else [100], "--bytes")
    warmup_s = warmup if warmup is not None else min(3.0, max(0.5, seconds / 4))
    points = [
        RelayPoint(c, chunks, b, seconds, warmup_s, delay, deflate, loadgen_procs, gateways, workers)
        for b in byte_counts
        for c in client_counts
    ]
    machine = machine_info()

    def body() -> list[dict[str, Any]]:
        return run_relay(
            points,
            limit=limit,
            sse=sse,
            workdir=work_dir,
            keep=keep,
            redis_max_connections=redis_max_connections,
            cluster_masters=redis_cluster,
            progress=_progress,
        )

    if redis_cluster and limit:
        raise typer.BadParameter("the limit baseline needs one Redis server: add --no-limit")
    results: list[dict[str, Any]] = _run("relay", body)
    # A sweep's table is wide: not squeezed into 80 columns when output is not a terminal.
    (console if console.is_terminal else Console(width=160)).print(relay_table(results))
    if json_path is not None:
        data: dict[str, Any] = {"benchmark": "relay", "machine": machine, "argv": sys.argv[1:]}
        if len(results) == 1:
            data.update(results[0])
        data["runs"] = results
        write_report(json_path, data)
    if plot is not None:
        _run("relay", lambda: relay_plot(results, plot))


@app.command()
def idle(
    connections: Annotated[int, typer.Option(min=1, help="Idle connections to hold open (N)")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, help="Handshakes in flight per load generator")] = 200,
    loadgen_procs: Annotated[
        int | None, typer.Option(min=1, help="Load generator processes [1, or 2 above 2000]")
    ] = None,
    deflate: Annotated[bool, typer.Option(help="Clients offer permessage-deflate")] = False,
    json_path: _JsonOption = None,
    plot: _PlotOption = None,
    work_dir: _WorkDirOption = None,
    keep: _KeepOption = False,
) -> None:
    """N authenticated idle connections: gateway RSS per connection and handshakes/s."""
    machine = machine_info()

    def body() -> dict[str, Any]:
        return run_idle(
            connections,
            concurrency=concurrency,
            loadgen_procs=loadgen_procs,
            deflate=deflate,
            workdir=work_dir,
            keep=keep,
            progress=_progress,
        )

    result: dict[str, Any] = _run("idle", body)
    console.print(idle_table(result))
    if json_path is not None:
        write_report(json_path, {**result, "machine": machine, "argv": sys.argv[1:]})
    if plot is not None:
        _run("idle", lambda: idle_plot(result, plot))
    if result["opened"] < connections:
        console.print(f"[yellow]only {result['opened']} of {connections} connections opened[/yellow]")
        raise typer.Exit(1)


def _progress(message: str) -> None:
    console.print(message, style="dim")
