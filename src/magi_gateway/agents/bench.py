"""A synthetic agent for benchmarks: K chunks of B bytes, D seconds apart.

Each chunk starts with the worker's send time, ``time.time_ns()`` in decimal, and a
space, padded with ``x`` to ``chunk_bytes``: a client on the same host subtracts it
from its receipt time to get the chunk's latency (``magi-gateway bench relay``).
Chunks shorter than the stamp (20 bytes) are the stamp alone.
"""

from __future__ import annotations

import asyncio
import time

from magi_gateway.worker.sdk import Agent, Context, Judgement

__all__ = ["BenchAgent", "chunk_sent_ns"]


def chunk_sent_ns(thinking: str) -> int:
    """The send time (ns since the epoch) a bench chunk starts with."""
    stamp, _, _ = thinking.partition(" ")
    return int(stamp)


class BenchAgent(Agent):
    """Streams ``chunks`` time-stamped chunks of ``chunk_bytes`` bytes each, then approves."""

    def __init__(
        self,
        name: str = "bench",
        *,
        chunks: int = 50,
        chunk_bytes: int = 100,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.chunks = chunks
        #: Padding each chunk's send stamp is written over.
        self.payload = "x" * chunk_bytes
        self.delay_s = delay_s

    def chunk(self) -> str:
        """One chunk: the send stamp, a space, then padding up to ``chunk_bytes``."""
        stamp = f"{time.time_ns()} "
        return stamp + self.payload[len(stamp) :]

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Stream the synthetic chunks."""
        for _ in range(self.chunks):
            await ctx.think(self.chunk())
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        return Judgement("done", decision="approve")
