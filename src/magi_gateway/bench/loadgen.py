"""Load generator process: ``python -m magi_gateway.bench.loadgen CONFIG.json``.

Raw ``websockets`` asyncio clients on uvloop with orjson, kept apart from the
orchestrator so its CPU is measured on its own. It talks to the orchestrator
through small JSON files in its directory, written whole (temp file + rename):

relay
    connect ``clients`` clients, write ``ready``; wait for ``go`` (``t0_ns``,
    ``t1_ns``); run each client in a closed loop (send ``agent_judgement``, read
    until ``agent_judgement_complete``, repeat) until ``t1_ns``; write ``result``
    with the chunks and requests received within ``[t0_ns, t1_ns)`` and their
    latency histograms. The time before ``t0_ns`` is the warm-up. An error frame
    (``backend_unavailable``...) is counted, then the client backs off as ``MagiClient``
    does (0.1 s doubling to 5 s, with jitter) before its next request.
idle
    write ``ready``; wait for ``go``; open ``clients`` authenticated connections,
    ``concurrency`` at a time, and write ``result``; hold them until ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from magi_gateway.agents.bench import chunk_sent_ns
from magi_gateway.bench._stats import Histogram
from magi_gateway.bench.sse_client import HttpStatusError, SseConnection, open_many
from magi_gateway.core.auth import compute_token, minute_of

__all__ = ["LoadgenConfig", "config_json", "main", "write_json"]

_STREAM = "agent_judgement_stream"
_COMPLETE = "agent_judgement_complete"
_SSE_PATH = "/v1/judgements"
_POLL_S = 0.01
_RUN_ID = secrets.token_hex(6)
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 5.0


@dataclass(frozen=True)
class LoadgenConfig:
    """What one load generator process does (written as JSON by the orchestrator)."""

    mode: str  # "relay" or "idle"
    url: str
    appid: str
    secret: str
    clients: int
    directory: str
    agent_ids: list[str] = field(default_factory=lambda: ["bench"])
    #: Frames one request may bring before the client gives up on it (bounds the read loop).
    max_frames_per_request: int = 1000
    deflate: bool = False
    #: Relay: "ws" (``url`` is the WebSocket's) or "sse" (``url`` is the gateway's http:// root;
    #: each request is a ``POST /v1/judgements`` answered as an event stream).
    transport: str = "ws"
    concurrency: int = 200
    open_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    #: Relay: client i sends its first request ``stagger_s * i / clients`` after ``go``, so
    #: that clients (and with ``--delay``, their chunks) are not in lockstep.
    stagger_s: float = 0.0
    #: Longest wait for ``go`` or ``stop``.
    wait_timeout_s: float = 900.0
    name: str = "loadgen"

    def path(self, name: str) -> Path:
        """A coordination file in this process's directory."""
        return Path(self.directory) / name


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically, so a poller never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def _poll_file(path: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} within {timeout_s:g}s")
        time.sleep(_POLL_S)
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


async def _wait_file(path: Path, timeout_s: float) -> dict[str, Any]:
    """The orchestrator's file ``path`` once it exists (polled in a thread: the loop stays free)."""
    return await asyncio.to_thread(_poll_file, path, timeout_s)


async def _connect(config: LoadgenConfig) -> ClientConnection:
    """One authenticated connection, after its ``connection_established``."""
    token = compute_token(config.appid, config.secret, minute_of(time.time()))
    query = urlencode({"appid": config.appid, "token": token})
    ws = await websockets.connect(
        f"{config.url}?{query}",
        compression="deflate" if config.deflate else None,
        open_timeout=config.open_timeout_s,
        ping_interval=None,
        max_size=None,
        proxy=None,
    )
    try:
        async with asyncio.timeout(config.open_timeout_s):
            hello = orjson.loads(await ws.recv(decode=False))
    except BaseException:
        await ws.close()
        raise
    if hello.get("type") != "connection_established":
        await ws.close()
        raise ConnectionError(f"refused: {hello.get('code') or hello}")
    return ws


async def _connect_all(config: LoadgenConfig, errors: Counter[str]) -> tuple[list[ClientConnection], int]:
    """Open ``config.clients`` connections, ``config.concurrency`` at a time."""
    gate = asyncio.Semaphore(config.concurrency)

    async def one() -> ClientConnection | None:
        async with gate:
            try:
                return await _connect(config)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                errors[f"connect: {type(exc).__name__}: {exc}"[:200]] += 1
                return None

    opened = await asyncio.gather(*(one() for _ in range(config.clients)))
    last_ns = time.time_ns()
    return [ws for ws in opened if ws is not None], last_ns


class _RelayStats:
    __slots__ = ("chunk_latency", "chunks", "errors", "frames", "request_latency", "requests")

    def __init__(self) -> None:
        self.chunks = 0
        self.requests = 0
        self.frames = 0
        self.chunk_latency = Histogram()
        self.request_latency = Histogram()
        self.errors: Counter[str] = Counter()


_DONE, _FAILED = "done", "failed"


def _count_frame(raw: bytes, sent_ns: int, t0_ns: int, t1_ns: int, stats: _RelayStats) -> str | None:
    """Count one frame of the current request; ``_DONE`` or ``_FAILED`` when the request ends."""
    now_ns = time.time_ns()
    message = orjson.loads(raw)
    kind = message.get("type")
    in_window = t0_ns <= now_ns < t1_ns
    if in_window:
        stats.frames += 1
    if kind == _STREAM:
        sent = chunk_sent_ns(message["data"]["thinking"])
        if sent < sent_ns:
            # Older than the request: a replayed session, not a new one.
            stats.errors["chunk older than its request"] += 1
        elif in_window:
            stats.chunks += 1
            stats.chunk_latency.add((now_ns - sent) / 1000)
    elif kind == _COMPLETE:
        if in_window:
            stats.requests += 1
            stats.request_latency.add((now_ns - sent_ns) / 1000)
        return _DONE
    elif "error" in message:
        stats.errors[f"error frame: {message.get('code')}"] += 1
        return _FAILED
    return None


async def _ws_request(
    ws: ClientConnection, request: bytes, config: LoadgenConfig, t: tuple[int, int], stats: _RelayStats
) -> str | None:
    """One request over the WebSocket: send it, count its frames until it ends."""
    sent_ns = time.time_ns()
    await ws.send(request.decode())
    for _ in range(config.max_frames_per_request):
        if (outcome := _count_frame(await ws.recv(decode=False), sent_ns, *t, stats)) is not None:
            return outcome
    return None


async def _sse_request(
    http: SseConnection, request: bytes, config: LoadgenConfig, t: tuple[int, int], stats: _RelayStats
) -> str | None:
    """One request over HTTP: ``POST /v1/judgements`` as an event stream, counted to its end."""
    sent_ns = time.time_ns()
    token = compute_token(config.appid, config.secret, minute_of(time.time()))
    headers = {"X-Magi-Appid": config.appid, "X-Magi-Token": token}
    outcome: str | None = None
    frames = 0
    try:
        async for data in http.stream(_SSE_PATH, request, headers):
            frames += 1
            if frames > config.max_frames_per_request:
                return None
            outcome = _count_frame(data, sent_ns, *t, stats) or outcome
    except HttpStatusError as exc:
        stats.errors[f"HTTP {exc.status}"] += 1
        return _FAILED
    return outcome or _FAILED


async def _relay_client(
    link: ClientConnection | SseConnection,
    config: LoadgenConfig,
    index: int,
    t0_ns: int,
    t1_ns: int,
    stats: _RelayStats,
) -> None:
    """One closed-loop client: a request, all its frames, the next request."""
    request = {"type": "agent_judgement", "agent_ids": config.agent_ids, "data": {"user_input": "bench"}}
    # request_id is an idempotency key: one reused within its retention would get the
    # old session replayed instead of a new one, so every process draws its own prefix.
    prefix = f"{config.name}-{_RUN_ID}-{index}"
    sent_requests = failures = 0
    await asyncio.sleep(config.stagger_s * index / max(config.clients, 1))
    while time.time_ns() < t1_ns:
        sent_requests += 1
        request["request_id"] = f"{prefix}-{sent_requests}"
        body = orjson.dumps(request)
        try:
            async with asyncio.timeout(config.request_timeout_s):
                if isinstance(link, SseConnection):
                    if link.closed:
                        link = await SseConnection.open(config.url)
                    outcome = await _sse_request(link, body, config, (t0_ns, t1_ns), stats)
                else:
                    outcome = await _ws_request(link, body, config, (t0_ns, t1_ns), stats)
        except TimeoutError:
            stats.errors["request timeout"] += 1
            return
        except websockets.ConnectionClosed as exc:
            stats.errors[f"connection closed: {exc.rcvd.code if exc.rcvd else None}"] += 1
            return
        except (OSError, asyncio.IncompleteReadError) as exc:
            stats.errors[f"connection lost: {type(exc).__name__}"] += 1
            return
        if outcome is None:
            stats.errors["too many frames for one request"] += 1
            return
        failures = failures + 1 if outcome == _FAILED else 0
        if failures:
            # Back off after an error as MagiClient does, rather than hammer a failing gateway.
            delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**failures)
            await asyncio.sleep(random.uniform(delay / 2, delay))


async def _close_all(connections: Sequence[ClientConnection | SseConnection], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def close(link: ClientConnection | SseConnection) -> None:
        async with gate:
            with contextlib.suppress(OSError, websockets.WebSocketException):
                await link.close()

    await asyncio.gather(*(close(ws) for ws in connections))


async def _relay(config: LoadgenConfig) -> None:
    stats = _RelayStats()
    connections: list[ClientConnection | SseConnection] = []
    if config.transport == "sse":
        connections.extend(await open_many(config.url, config.clients, config.concurrency, stats.errors))
    else:
        connections.extend((await _connect_all(config, stats.errors))[0])
    write_json(config.path("ready"), {"connected": len(connections)})
    go = await _wait_file(config.path("go"), config.wait_timeout_s)
    t0_ns, t1_ns = int(go["t0_ns"]), int(go["t1_ns"])
    await asyncio.gather(
        *(_relay_client(ws, config, i, t0_ns, t1_ns, stats) for i, ws in enumerate(connections))
    )
    await _close_all(connections, config.concurrency)
    write_json(
        config.path("result"),
        {
            "connected": len(connections),
            "chunks": stats.chunks,
            "requests": stats.requests,
            "frames": stats.frames,
            "chunk_latency": stats.chunk_latency.to_json(),
            "request_latency": stats.request_latency.to_json(),
            "errors": dict(stats.errors),
        },
    )


async def _idle(config: LoadgenConfig) -> None:
    errors: Counter[str] = Counter()
    write_json(config.path("ready"), {})
    await _wait_file(config.path("go"), config.wait_timeout_s)
    start_ns = time.time_ns()
    connections, last_ns = await _connect_all(config, errors)
    write_json(
        config.path("result"),
        {"opened": len(connections), "start_ns": start_ns, "last_ns": last_ns, "errors": dict(errors)},
    )
    await _wait_file(config.path("stop"), config.wait_timeout_s)
    open_at_stop = sum(1 for ws in connections if ws.close_code is None)
    await _close_all(connections, config.concurrency)
    write_json(config.path("closed"), {"open_at_stop": open_at_stop})


def main(argv: list[str] | None = None) -> None:
    """Run the load generator described by the JSON file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    config = LoadgenConfig(**orjson.loads(Path(args[0]).read_bytes()))
    runner = _relay if config.mode == "relay" else _idle
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(runner(config))
    else:
        uvloop.run(runner(config))


def config_json(config: LoadgenConfig) -> dict[str, Any]:
    """``config`` as the JSON object ``main`` reads."""
    return asdict(config)


if __name__ == "__main__":
    main()
