"""A synthetic agent for benchmarks: K chunks of B bytes, D seconds apart."""

from __future__ import annotations

import asyncio

from ..sdk import Agent, Context, Judgement

__all__ = ["BenchAgent"]


class BenchAgent(Agent):
    """Streams ``chunks`` chunks of ``chunk_bytes`` bytes each, then approves."""

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
        self.payload = "x" * chunk_bytes
        self.delay_s = delay_s

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Stream the synthetic chunks."""
        for _ in range(self.chunks):
            await ctx.think(self.payload)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        return Judgement("done", decision="approve")
