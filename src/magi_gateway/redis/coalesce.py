"""Pipelined round trips: calls of a script, many at once (``call_scripts``) or one at a
time from many tasks, coalesced (``CoalescedScript``); and any commands of many tasks,
coalesced (``CoalescedPipeline``, the openings of judgements, ``redis.opening``).

``call_scripts`` sends calls of one registered script in one pipeline, each caller's reply
or error apart: a command Redis refuses in one call fails that call only
(``BackendCommandError``); a connection lost mid-pipeline fails every call in it
(``BackendUnavailable``: nobody knows which ran; the scripts' callers retry, and what they
write is deduplicated or harmless twice); a script the server does not know (a new or
restarted server) is loaded by the Script object and that call sent again. A Redis Cluster
refuses scripts in pipelines: there the calls run concurrently, one command each. Both the
chunk writer (``redis.chunks``) and ``CoalescedScript`` send theirs so.

A worker writes the final and then the completion of each request it runs, each a call of
``lua/append.lua``, from as many tasks as it runs requests. Sent one by one, each call pays
a round trip of its own in redis-py (a connection taken and released, a write, a wake-up
for the reply): in a profile of ``magi-gateway bench relay`` these two calls were twice
the worker's cost of streaming every chunk. ``CoalescedScript``: a call made while a round
trip is in flight waits for it to end and then goes out with every other call made
meanwhile, in one pipeline (at most ``max_batch``); a call made while none is in flight
goes out at once. redis-py has no automatic pipelining for asyncio, hence this module. A
caller cancelled while its call is in flight does not disturb the others: the round trip
runs in its own task. Bounds (overflow policy: wait): a caller waits for its future, so
the queue holds at most one call per waiting task. On a Cluster each call runs on its own.

A call may carry commands to send just before it, in the same round trip (``before``):
Redis runs them first, so whoever sees what the script writes sees their effect too. They
are best effort, for writes that something else repairs: their errors are logged, and
never fail the call (the script runs whatever they answered).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from magi_gateway.core.errors import BackendUnavailable, GatewayError
from magi_gateway.redis.client import RedisClient, gateway_error, redis_errors

__all__ = ["CoalescedPipeline", "CoalescedScript", "ScriptCall", "call_scripts"]

logger = logging.getLogger("magi_gateway.redis")

_Item = TypeVar("_Item")


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One call of a script: its KEYS and ARGV, and commands sent just before it."""

    keys: list[str]
    args: list[Any]
    before: Sequence[tuple[Any, ...]] = ()


async def call_scripts(redis: RedisClient, script: AsyncScript, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, or its ``GatewayError``, in order, in one round trip (see above)."""
    if isinstance(redis, RedisCluster):
        alone = await asyncio.gather(*(_call_alone(redis, script, c) for c in calls), return_exceptions=True)
        for outcome in alone:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # CancelledError and the like: not an outcome
        return [_outcome(outcome) for outcome in alone]
    try:
        with redis_errors():
            async with redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    for command in call.before:
                        pipe.execute_command(*command)
                    pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
                replies = await pipe.execute(raise_on_error=False)
    except GatewayError as exc:
        return [exc] * len(calls)
    outcomes: list[Any] = []
    position = 0
    for call in calls:
        _log_failures(call.before, replies[position : position + len(call.before)])
        reply = replies[position + len(call.before)]
        position += len(call.before) + 1
        if isinstance(reply, NoScriptError):
            try:
                reply = await _call_alone(redis, script, ScriptCall(call.keys, call.args))
            except GatewayError as exc:
                reply = exc
        outcomes.append(_outcome(reply))
    return outcomes


def _outcome(reply: Any) -> Any:
    """A reply, or the gateway's error for a failure."""
    if isinstance(reply, Exception) and not isinstance(reply, GatewayError):
        return gateway_error(reply)
    return reply


async def _call_alone(redis: RedisClient, script: AsyncScript, call: ScriptCall) -> Any:
    """One call, its ``before`` commands first, each a round trip (loads a lost script)."""
    for command in call.before:
        try:
            with redis_errors():
                await redis.execute_command(*command)
        except GatewayError as exc:
            _log_failures([command], [exc])
    with redis_errors():
        return await script(keys=call.keys, args=call.args)


def _log_failures(commands: Sequence[tuple[Any, ...]], replies: Sequence[Any]) -> None:
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, Exception):
            logger.warning("%s before a script call failed: %r", command[0], reply)


class _Coalescer(Generic[_Item]):
    """Items submitted from many tasks, sent ``max_batch`` at a time, one round trip after
    the other; each submitter gets its own outcome (see the module docstring)."""

    def __init__(self, redis: RedisClient, *, max_batch: int = 64) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._queue: list[tuple[_Item, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        #: Round trips made and calls sent in them (for tests and benchmarks).
        self.round_trips = 0
        self.calls = 0

    async def _submit(self, item: _Item) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="magi-shared-round-trips")
        return await future

    async def _round_trip(self, items: list[_Item]) -> list[Any]:
        raise NotImplementedError

    async def _send(self) -> None:
        batch: list[tuple[_Item, asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                batch = [(item, future) for item, future in batch if not future.done()]  # callers gone
                if batch:
                    outcomes = await self._round_trip([item for item, _ in batch])
                    self.round_trips += 1
                    self.calls += len(batch)
                    for (_item, future), outcome in zip(batch, outcomes, strict=True):
                        _settle(future, outcome)
                batch = []
        except asyncio.CancelledError:
            stopping = BackendUnavailable("stopping")
            for _item, future in [*batch, *self._queue]:
                _settle(future, stopping)
            self._queue = []
            raise
        finally:
            self._sender = None


class CoalescedScript(_Coalescer[ScriptCall]):
    """``await script(keys, args)``: one call of a registered script, sharing round trips."""

    def __init__(self, redis: RedisClient, script: AsyncScript, *, max_batch: int = 64) -> None:
        super().__init__(redis, max_batch=max_batch)
        self.script = script

    async def __call__(
        self, keys: list[str], args: list[Any], *, before: Sequence[tuple[Any, ...]] = ()
    ) -> Any:
        call = ScriptCall(keys, args, before)
        if isinstance(self.redis, RedisCluster):
            return await _call_alone(self.redis, self.script, call)
        return await self._submit(call)

    async def _round_trip(self, items: list[ScriptCall]) -> list[Any]:
        return await call_scripts(self.redis, self.script, items)


class CoalescedPipeline(_Coalescer[Sequence[tuple[Any, ...]]]):
    """``await pipeline(commands)``: one caller's commands, in order, in a round trip
    shared with other callers' (one server; a Cluster runs each caller's on its own).

    The replies come as from ``execute(raise_on_error=False)``: a command Redis refuses
    is its exception, in its place; a round trip that fails raises its
    ``BackendUnavailable`` in every caller."""

    async def __call__(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if isinstance(self.redis, RedisCluster):
            (outcome,) = await self._round_trip([commands])
        else:
            outcome = await self._submit(commands)
        if isinstance(outcome, GatewayError):
            raise outcome
        replies: list[Any] = outcome
        return replies

    async def _round_trip(self, items: list[Sequence[tuple[Any, ...]]]) -> list[Any]:
        try:
            with redis_errors():
                async with self.redis.pipeline(transaction=False) as pipe:
                    for commands in items:
                        for command in commands:
                            pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
        except GatewayError as exc:
            return [exc] * len(items)
        outcomes, start = [], 0
        for commands in items:
            outcomes.append(replies[start : start + len(commands)])
            start += len(commands)
        return outcomes


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
