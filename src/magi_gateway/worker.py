"""The worker runner: reads requests for its agents from Redis and runs them.

Each agent has a request stream; all workers of an agent join its consumer group,
so each request goes to one of them. A request is acknowledged (XACK) only after
its final is in the session log. ``burst=True`` makes ``run`` return once the
streams are empty and nothing is running (handy in tests and batch jobs).

Shutdown (``stop``), top to bottom: stop reading, let running agents finish within
``grace_s`` (the rest stay unacknowledged for another worker to take over), leave
the live set, close Redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ._redis import Backoff, connect, redis_errors
from ._types import AgentId
from .errors import AgentError, BackendUnavailable
from .keys import WORKER_GROUP, Keys
from .sdk import Agent, Context, Judgement, JudgementClosed
from .session import ResultCode
from .settings import Settings
from .store import Request, Store, now_ms

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

_READ_BLOCK_MS = 1000
_FINAL_RETRY_LIMIT = 20


class Worker:
    """Serves one or more agents from one process."""

    def __init__(
        self,
        agents: Sequence[Agent],
        settings: Settings | None = None,
        *,
        concurrency: int | None = None,
        burst: bool = False,
        redis: Redis | None = None,
        grace_s: float = 10.0,
    ) -> None:
        if not agents:
            raise ValueError("a worker needs at least one agent")
        self.settings = settings if settings is not None else Settings()
        self.agents: dict[AgentId, Agent] = {a.agent_id: a for a in agents}
        self.concurrency = concurrency or self.settings.worker_concurrency
        self.burst = burst
        self.grace_s = grace_s
        self.worker_id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.keys = Keys(self.settings.redis_key_prefix)
        self.redis = redis if redis is not None else connect(self.settings, client_name="magi-worker")
        self.store = Store(self.redis, self.keys)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._active: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.processed = 0

    async def run(self) -> None:
        """Serve requests until ``stop`` (or, in burst mode, until idle)."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="magi-heartbeat")
        try:
            await self._read_loop()
        finally:
            await self._drain()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            try:
                await self.store.retire_worker(self.worker_id, list(self.agents))
            except BackendUnavailable:
                logger.warning("could not leave the live set; it expires by itself")
            await self.redis.aclose()

    def stop(self) -> None:
        """Ask ``run`` to finish: no new requests, running ones get ``grace_s``."""
        self._stopping.set()

    async def _ensure_groups(self) -> None:
        for agent_id in self.agents:
            try:
                with redis_errors():
                    await self.redis.xgroup_create(
                        self.keys.requests(agent_id), WORKER_GROUP, id="0", mkstream=True
                    )
            except BackendUnavailable as exc:
                if isinstance(exc.__cause__, ResponseError) and "BUSYGROUP" in str(exc.__cause__):
                    continue
                raise

    async def _heartbeat(self) -> None:
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        while True:
            try:
                await self.store.heartbeat(self.worker_id, list(self.agents), ttl_ms)
            except BackendUnavailable:
                logger.debug("heartbeat failed; Redis unavailable")
            await asyncio.sleep(self.settings.worker_heartbeat_interval_s)

    async def _read_loop(self) -> None:
        backoff = Backoff(self.settings.redis_backoff_base_s, self.settings.redis_backoff_cap_s)
        streams: Any = {self.keys.requests(a): ">" for a in self.agents}
        groups_ready = False
        while not self._stopping.is_set():
            await self._slots.acquire()
            self._slots.release()
            free = self._free_slots()
            try:
                if not groups_ready:
                    await self._ensure_groups()
                    groups_ready = True
                with redis_errors():
                    reply: Any = await self.redis.xreadgroup(
                        WORKER_GROUP, self.worker_id, streams, count=free, block=_READ_BLOCK_MS
                    )
            except BackendUnavailable as exc:
                groups_ready = False
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    logger.warning("cannot read requests (%s); retrying", exc.__cause__)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if not reply:
                if self.burst and not self._active:
                    return
                continue
            for _stream, entries in reply:
                for message_id, fields in entries:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._serve(Request.from_fields(message_id, fields)))
                    self._active.add(task)
                    task.add_done_callback(self._served)

    def _free_slots(self) -> int:
        return max(self.concurrency - len(self._active), 1)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slots.release()
        self.processed += 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("request handling failed", exc_info=exc)

    async def _drain(self) -> None:
        if not self._active:
            return
        _done, pending = await asyncio.wait(set(self._active), timeout=self.grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(self, request: Request) -> None:
        agent = self.agents[request.agent_id]
        remaining_s = (request.deadline_ms - now_ms()) / 1000
        if remaining_s <= 0:
            # The gateway has already given this agent its timeout final.
            await self._ack(request)
            return

        async def sink(text: str) -> bool:
            result = await self.store.append_stream(request.session_id, request.agent_id, {"thinking": text})
            return result.seq is not None

        ctx = Context(
            session_id=request.session_id,
            agent_id=request.agent_id,
            appid=request.appid,
            deadline=request.deadline_ms / 1000,
            sink=sink,
        )
        code, data = ResultCode.OK, {}
        try:
            answer = await asyncio.wait_for(agent.judge(request.user_input, ctx), remaining_s)
            judgement = answer if isinstance(answer, Judgement) else Judgement(str(answer))
            data = judgement.to_data()
        except JudgementClosed:
            await self._ack(request)
            return
        except TimeoutError:
            await self._ack(request)  # the gateway writes the timeout final
            return
        except AgentError as exc:
            code, data = ResultCode.AGENT_ERROR, {"error": str(exc)}
        except Exception:
            logger.exception("agent %s failed on session %s", agent.name, request.session_id)
            code = ResultCode.AGENT_ERROR
            data = {"error": f"Agent '{agent.name}' failed with an internal error"}
        await self._write_final(request, code, data)
        await self._ack(request)

    async def _write_final(self, request: Request, code: ResultCode, data: dict[str, Any]) -> None:
        backoff = Backoff(self.settings.redis_backoff_base_s, self.settings.redis_backoff_cap_s)
        for _attempt in range(_FINAL_RETRY_LIMIT):
            try:
                await self.store.append_final(request.session_id, request.agent_id, code, data)
                return
            except BackendUnavailable:
                # Finals are deduplicated in Redis, so retrying cannot produce two.
                await asyncio.sleep(backoff.next_delay())
        raise BackendUnavailable("could not write a final; request left for takeover")

    async def _ack(self, request: Request) -> None:
        try:
            with redis_errors():
                await self.redis.xack(self.keys.requests(request.agent_id), WORKER_GROUP, request.message_id)
        except BackendUnavailable:
            logger.warning("could not acknowledge %s", request.message_id)
