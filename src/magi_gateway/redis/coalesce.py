"""Calls of one script from many tasks, coalesced into pipelined round trips.

A worker writes the final and then the completion of each request it runs, each a call of
``lua/append.lua``, from as many tasks as it runs requests. Sent one by one, each call pays
a round trip of its own in redis-py (a connection taken and released, a write, a wake-up
for the reply): in a profile of ``magi-gateway bench relay`` these two calls were twice
the worker's cost of streaming every chunk. Here a call made while a round trip is in
flight waits for it to end and then goes out with every other call made meanwhile, in one
pipeline (at most ``max_batch``); a call made while none is in flight goes out at once.
redis-py has no automatic pipelining for asyncio, hence this small module.

Each caller gets its own reply, or its own error: a command Redis refuses in one call
fails that call only (``BackendCommandError``); a connection lost mid-pipeline fails every
call in it (``BackendUnavailable``: nobody knows which ran; the append script's callers
retry, finals and the completion are deduplicated there). A caller cancelled while its
call is in flight does not disturb the others: the round trip runs in its own task. Bounds
(overflow policy: wait): a caller waits for its future, so the queue holds at most one
call per waiting task. A Redis Cluster refuses scripts in pipelines: there each call
runs on its own, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from magi_gateway.core.errors import BackendUnavailable, GatewayError
from magi_gateway.redis.client import RedisClient, gateway_error, redis_errors

__all__ = ["CoalescedScript"]

_Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class CoalescedScript:
    """``await script(keys, args)``: one call of a registered script, sharing round trips."""

    def __init__(self, redis: RedisClient, script: AsyncScript, *, max_batch: int = 64) -> None:
        self.redis = redis
        self.script = script
        self.max_batch = max_batch
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        #: Round trips made and calls sent in them (for tests and benchmarks).
        self.round_trips = 0
        self.calls = 0

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        if isinstance(self.redis, RedisCluster):
            with redis_errors():
                return await self.script(keys=keys, args=args)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="magi-script-calls")
        return await future

    async def _send(self) -> None:
        batch: list[_Call] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                batch = [call for call in batch if not call[2].done()]  # callers gone meanwhile
                if batch:
                    await self._round_trip(batch)
                batch = []
        except asyncio.CancelledError:
            stopping = BackendUnavailable("stopping")
            for _keys, _args, future in [*batch, *self._queue]:
                _fail(future, stopping)
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _round_trip(self, batch: list[_Call]) -> None:
        try:
            with redis_errors():
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args, _future in batch:
                        pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
        except GatewayError as exc:
            for _keys, _args, future in batch:
                _fail(future, exc)
            return
        self.round_trips += 1
        self.calls += len(batch)
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                # Not loaded (a new or restarted server): the Script object loads it.
                try:
                    with redis_errors():
                        reply = await self.script(keys=keys, args=args)
                except GatewayError as exc:
                    reply = exc
            if isinstance(reply, Exception):
                _fail(future, reply if isinstance(reply, GatewayError) else gateway_error(reply))
            elif not future.done():
                future.set_result(reply)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
