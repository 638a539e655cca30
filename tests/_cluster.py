"""A local 3-master Redis Cluster from the same binary as the other fixtures.

Slots are assigned with ``CLUSTER ADDSLOTSRANGE`` and the nodes introduced with
``CLUSTER MEET``, so no ``redis-cli --cluster create`` (not shipped by every
distribution of the server) is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from magi_gateway.embedded import RedisServer, free_port

SLOTS = 16384


class LocalCluster:
    """Three cluster-mode servers on 127.0.0.1 sharing the 16384 slots."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [
            RedisServer(
                data_dir / f"node{i}",
                persistence=True,
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

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the nodes, split the slots between them, wait for ``cluster_state:ok``."""
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(host=n.host, port=n.port) for n in self.nodes]
        try:
            share = SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", node.host, node.port, bus_port)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if all(self._ready(c) for c in clients):
                    return
                time.sleep(0.1)
            raise RuntimeError("the local cluster did not reach cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def _ready(self, client: redis.Redis) -> bool:
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
