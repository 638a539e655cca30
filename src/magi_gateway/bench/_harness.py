"""The processes of a benchmark: embedded Redis, gateway, worker, baseline's, load generators.

``harness()`` starts Redis (persistence off) in a work directory and stops it and
every child on exit, errors and Ctrl-C included. Children run with the work
directory as cwd (so no ``.env`` of the caller applies) and with the gateway's
settings variables of the caller's environment removed, so a run depends only on
its command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from magi_gateway._util import now_ms
from magi_gateway.bench._procs import (
    BenchError,
    Child,
    Children,
    python_module,
    wait_for,
    wait_http_ok,
    wait_tcp,
)
from magi_gateway.bench.limit_keys import ready_key
from magi_gateway.bench.loadgen import LoadgenConfig, config_json, write_json
from magi_gateway.core.ids import AgentId
from magi_gateway.embedded import LocalCluster, RedisServer, free_port
from magi_gateway.redis.keys import Keys
from magi_gateway.settings import Settings

__all__ = [
    "AGENT",
    "APPID",
    "PREFIX",
    "Harness",
    "harness",
    "signal_all",
    "sleep_until",
    "split",
    "wait_files",
]

APPID = "bench"
AGENT = AgentId("bench")
#: Key prefix of everything a benchmark writes (its own Redis, but still: never the default).
PREFIX = "bench"
_START_TIMEOUT_S = 60.0

SyncClient = redis.Redis | redis.RedisCluster


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive counts (fewer parts when ``total`` is small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class Harness:
    """A running Redis plus the children started against it."""

    workdir: Path
    children: Children
    #: One server, or a local cluster (``--redis-cluster``).
    redis: RedisServer | LocalCluster
    secret: str
    #: ``max_connections`` of the gateway's and worker's Redis pools (None: redis-py's default).
    redis_max_connections: int | None = None
    #: Keep the work dir (logs) even after a successful run.
    keep: bool = False

    @property
    def product_redis_url(self) -> str:
        """``REDIS_URL`` for the gateway and the worker."""
        if self.redis_max_connections is None or isinstance(self.redis, LocalCluster):
            return self.redis.url
        return f"{self.redis.url}?max_connections={self.redis_max_connections}"

    @property
    def redis_pids(self) -> list[int]:
        """PIDs of the Redis server, or of every cluster node."""
        if isinstance(self.redis, LocalCluster):
            return self.redis.pids
        assert self.redis.process is not None
        return [self.redis.process.pid]

    def sync_client(self) -> SyncClient:
        """A synchronous client of the benchmark's Redis, for the harness's own checks."""
        if isinstance(self.redis, LocalCluster):
            node = self.redis.nodes[0]
            return redis.RedisCluster(host=node.host, port=node.port)
        return redis.Redis.from_url(self.redis.url)

    def env(self, **settings: object) -> dict[str, str]:
        """Environment for a child: the caller's minus gateway settings, plus ``settings``."""
        fields = {name.upper() for name in Settings.model_fields}
        env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
        env.update(
            REDIS_URL=self.product_redis_url,
            REDIS_KEY_PREFIX=PREFIX,
            FIXED_SECRET=self.secret,
            PYTHONUNBUFFERED="1",
        )
        env.update({name.upper(): str(value) for name, value in settings.items()})
        return env

    def start_gateway(self, name: str, **settings: object) -> tuple[Child, int]:
        """``magi-gateway serve`` on a free port; returns once ``/readyz`` says ready."""
        port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        child = self.children.start(name, python_module("magi_gateway", *args), self.env(**settings))
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout_s=_START_TIMEOUT_S, watch=[child])
        return child, port

    def _limit_redis_url(self) -> str:
        if isinstance(self.redis, LocalCluster):
            raise BenchError("the limit baseline runs on one Redis server only (use --no-limit)")
        return self.redis.url

    def start_limit(self, name: str) -> tuple[Child, int]:
        """The baseline gateway on a free port; returns once it accepts connections."""
        port = free_port()
        args = ["--port", str(port), "--redis-url", self._limit_redis_url(), "--prefix", PREFIX]
        child = self.children.start(name, python_module("magi_gateway.bench.limit", *args), self.env())
        wait_tcp(port, timeout_s=_START_TIMEOUT_S, watch=[child])
        return child, port

    def start_limit_worker(self, name: str, *, chunks: int, chunk_bytes: int, delay_s: float) -> Child:
        """The baseline worker; returns once it is connected to Redis."""
        args = [
            *("--redis-url", self._limit_redis_url(), "--prefix", PREFIX, "--name", name),
            *("--chunks", str(chunks), "--bytes", str(chunk_bytes), "--delay", str(delay_s)),
        ]
        module = "magi_gateway.bench.limit_worker"
        child = self.children.start(name, python_module(module, *args), self.env())
        client = self.sync_client()
        try:
            wait_for(
                lambda: bool(client.exists(ready_key(PREFIX, name))),
                timeout_s=_START_TIMEOUT_S,
                what="the limit worker to connect",
                watch=[child],
            )
        finally:
            client.close()
        return child

    def flush_redis(self) -> None:
        """Empty the (single-server) Redis between runs, so no run pays for the last one's keys."""
        if isinstance(self.redis, LocalCluster):
            return
        client = self.sync_client()
        try:
            client.flushall()
        finally:
            client.close()

    def start_worker(
        self, name: str, *, chunks: int, chunk_bytes: int, delay_s: float, concurrency: int
    ) -> Child:
        """``magi-gateway agent bench``; returns once it heartbeats."""
        args = [
            "agent",
            "bench",
            "--chunks",
            str(chunks),
            "--bytes",
            str(chunk_bytes),
            "--delay",
            str(delay_s),
        ]
        env = self.env(worker_concurrency=concurrency)
        child = self.children.start(name, python_module("magi_gateway", *args), env)
        client = self.sync_client()
        workers = Keys(PREFIX).workers(AGENT)
        try:
            wait_for(
                lambda: int(client.zcount(workers, now_ms(), "+inf")) > 0,
                timeout_s=_START_TIMEOUT_S,
                what="the bench worker to heartbeat",
                watch=[child],
            )
        finally:
            client.close()
        return child

    def start_loadgens(self, name: str, configs: Sequence[LoadgenConfig]) -> list[Child]:
        """One load generator process per config (each in its own directory)."""
        started = []
        for index, config in enumerate(configs):
            directory = Path(config.directory)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "config.json"
            path.write_bytes(orjson.dumps(config_json(config)))
            args = python_module("magi_gateway.bench.loadgen", str(path))
            started.append(self.children.start(f"{name}-{index}", args, self.env()))
        return started

    def loadgen_dir(self, name: str) -> Path:
        """A fresh directory for a load generator's coordination files."""
        return self.workdir / f"{name}-{secrets.token_hex(3)}"


def wait_files(
    configs: Sequence[LoadgenConfig],
    name: str,
    *,
    timeout_s: float,
    watch: Sequence[Child],
    writers: Sequence[Child] = (),
) -> list[dict[str, Any]]:
    """Wait until every load generator wrote ``name``; return their contents.

    ``writers`` are the load generators (in ``configs`` order): one that exits without
    writing its file fails the wait at once, with its log.
    """
    paths = [config.path(name) for config in configs]

    def written() -> bool:
        for path, writer in zip(paths, writers, strict=False):
            # Alive first, then the file: a writer may write and exit in between.
            if not writer.alive() and not path.exists():
                writer.check_alive()
        return all(p.exists() for p in paths)

    wait_for(written, timeout_s=timeout_s, what=f"load generators' {name}", watch=watch)
    return [orjson.loads(p.read_bytes()) for p in paths]


def signal_all(configs: Sequence[LoadgenConfig], name: str, data: Mapping[str, Any]) -> None:
    """Write the coordination file ``name`` for every load generator."""
    for config in configs:
        write_json(config.path(name), dict(data))


def sleep_until(deadline_ns: int, watch: Sequence[Child]) -> None:
    """Sleep until ``deadline_ns`` (``time.time_ns``), checking that ``watch`` stays alive."""
    while (remaining := (deadline_ns - time.time_ns()) / 1e9) > 0:
        time.sleep(min(remaining, 0.25))
        for child in watch:
            child.check_alive()


@contextlib.contextmanager
def harness(
    workdir: Path | None = None,
    *,
    keep: bool = False,
    redis_max_connections: int | None = None,
    cluster_masters: int = 0,
) -> Iterator[Harness]:
    """Redis (or a cluster of ``cluster_masters`` nodes) and a process registry in ``workdir``.

    ``workdir`` defaults to a temp dir, removed after success.
    """
    created = workdir is None
    root = Path(tempfile.mkdtemp(prefix="magi-bench-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        server: RedisServer | LocalCluster = (
            LocalCluster(root / "redis", cluster_masters, persistence=False)
            if cluster_masters
            else RedisServer(root / "redis", persistence=False)
        )
        with server, Children(root) as children:
            h = Harness(root, children, server, secrets.token_urlsafe(12), redis_max_connections, keep)
            yield h
        ok = not h.keep
    except BenchError as exc:
        raise BenchError(f"{exc}\n(logs kept in {root})") from exc
    finally:
        if ok and created:
            shutil.rmtree(root, ignore_errors=True)
