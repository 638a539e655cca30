"""The worker runner: reads requests for its agents from Redis and runs them.

Each agent has a request stream; all workers of an agent join its consumer group,
so each request goes to one of them. A request is acknowledged (and deleted) only
after its final is in the session log. While an agent runs, its worker keeps the
request fresh in the group's pending list; a request whose worker died goes idle and
is taken over by another worker after ``worker_claim_idle_s`` — at most
``worker_max_deliveries`` times in all, then it gets a ``result_code`` 5 final.
A retried attempt streams its thinking again from the start, each chunk marked
with ``data.attempt`` (2, 3, ...).

``burst=True`` makes ``run`` return once the streams are empty and nothing runs.

Start-up: every agent's ``setup``, then heartbeats and reading. Shutdown (``stop``),
top to bottom: stop reading, let running agents finish within ``grace_s`` (the rest
stay unacknowledged for another worker to take over), every agent's ``close``, leave
the live set, close Redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

from magi_gateway._tasks import cancel_and_wait
from magi_gateway._util import Backoff, now_ms
from magi_gateway.core.errors import AgentError, BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.output_limits import checked_final
from magi_gateway.core.session import ResultCode
from magi_gateway.logs import session_id_var
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.requests import Request, RequestQueue
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker import sdk
from magi_gateway.worker._finisher import RequestFinisher
from magi_gateway.worker.appender import ChunkAppender, ChunkStream
from magi_gateway.worker.sdk import Agent, AgentUnavailable, Context, Judgement, JudgementClosed

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

_READ_BLOCK_MS = 1000
_FINAL_RETRY_LIMIT = 20


class _Job:
    """One request being served, with its context (for cancellation)."""

    __slots__ = ("ctx", "request", "task")

    def __init__(self, request: Request, ctx: Context, task: asyncio.Task[None]) -> None:
        self.request = request
        self.ctx = ctx
        self.task = task


class Worker:
    """Serves one or more agents from one process."""

    def __init__(
        self,
        agents: Sequence[Agent],
        settings: Settings | None = None,
        *,
        concurrency: int | None = None,
        burst: bool = False,
        grace_s: float = 10.0,
    ) -> None:
        if not agents:
            raise ValueError("a worker needs at least one agent")
        self.settings = settings if settings is not None else Settings()
        self.agents: dict[AgentId, Agent] = {a.agent_id: a for a in agents}
        self.aliases = sdk.declared_aliases(agents)  # alias to agent, for the heartbeats
        self.concurrency = concurrency or self.settings.worker_concurrency
        self.burst = burst
        self.grace_s = grace_s
        self.worker_id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.keys = Keys(self.settings.redis_key_prefix)
        self.redis = connect(self.settings, client_name="magi-worker")
        self.store = Store(self.redis, self.keys)
        self.queue = RequestQueue(self.redis, self.keys, list(self.agents), self.worker_id)
        self.appender = ChunkAppender(self.store, Backoff.for_settings(self.settings))
        self.finisher = RequestFinisher(self.queue)
        self.claim_idle_ms = int(self.settings.worker_claim_idle_s * 1000)
        #: By (stream, entry id): entry ids are unique per stream only (one script call
        #: queues a session's requests for several agents in the same millisecond).
        self._jobs: dict[tuple[str, bytes], _Job] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self.processed = 0

    async def run(self) -> None:
        """Serve requests until ``stop`` (or, in burst mode, until idle).

        Every agent's ``setup`` runs first, in order (one raising ends ``run`` with its
        exception); after draining, ``close`` runs for every agent whose ``setup``
        returned, however ``run`` ends.
        """
        helpers: list[asyncio.Task[None]] = []
        ready: list[Agent] = []
        try:
            for agent in self.agents.values():
                await agent.setup()
                ready.append(agent)
            helpers = [
                asyncio.create_task(self._heartbeat(), name="magi-heartbeat"),
                asyncio.create_task(self._listen_for_cancels(), name="magi-cancels"),
            ]
            await self._read_loop()
        finally:
            await self._drain()
            await cancel_and_wait(helpers)
            await self.appender.aclose()
            await self.finisher.aclose()
            await _close_agents(ready)
            try:
                await self.store.liveness.retire_worker(self.worker_id, list(self.agents))
            except BackendUnavailable:
                logger.warning("could not leave the live set; it expires by itself")
            await self.redis.aclose()

    def stop(self) -> None:
        """Ask ``run`` to finish: no new requests, running ones get ``grace_s``."""
        self._stopping.set()

    # -- reading -------------------------------------------------------------------

    async def _free_slots(self) -> int:
        """Wait for a free slot; 0 when stopping."""
        while len(self._jobs) >= self.concurrency and not self._stopping.is_set():
            self._slot_freed.clear()
            stop = asyncio.ensure_future(self._stopping.wait())
            freed = asyncio.ensure_future(self._slot_freed.wait())
            await asyncio.wait({stop, freed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            freed.cancel()
        return 0 if self._stopping.is_set() else self.concurrency - len(self._jobs)

    async def _read_loop(self) -> None:
        backoff = Backoff.for_settings(self.settings)
        groups_ready = False
        while (free := await self._free_slots()) > 0:
            try:
                if not groups_ready:
                    await self.queue.ensure_groups()
                    groups_ready = True
                batch: list[tuple[Request, int]] | None = await self._take_over(free)
                if not batch:
                    batch = await self._read_new(free)
            except BackendUnavailable as exc:
                groups_ready = False
                await asyncio.sleep(backoff.failed(logger, "reading requests", exc))
                continue
            except BackendCommandError as exc:
                # Not an outage: say so each time (with backoff), nothing else to move on to.
                logger.error("reading requests failed: %s", exc.__cause__)
                groups_ready = False
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if batch is None:
                return  # stopping
            if not batch and self.burst and not self._jobs:
                return
            for request, attempt in batch:
                self._start(request, attempt)

    async def _read_new(self, count: int) -> list[tuple[Request, int]] | None:
        """New requests (None when ``stop`` interrupted the blocking read)."""
        # Entries an interrupted read may still deliver stay pending and are taken over later.
        requests = await self.queue.read_new(count, self._stopping, _READ_BLOCK_MS)
        return None if requests is None else [(request, 1) for request in requests]

    async def _take_over(self, count: int) -> list[tuple[Request, int]]:
        """Claim requests whose worker went silent; fail those past the delivery limit."""
        now = time.monotonic()
        if now - self._last_claim < self.settings.worker_claim_idle_s / 4:
            return []
        self._last_claim = now
        taken: list[tuple[Request, int]] = []
        for stream in await self.queue.streams():
            for entry in await self.queue.stale(stream, count, self.claim_idle_ms):
                if (stream.key, entry.message_id) in self._jobs:
                    continue  # ours and running; its refresh was merely late
                request = await self.queue.claim(stream, entry.message_id, self.claim_idle_ms)
                if request is None:
                    continue  # another worker was faster, or the entry is gone
                attempt = entry.times_delivered + 1
                logger.warning(
                    "taking over request %s of session %s (attempt %d)",
                    request.message_id,
                    request.session_id,
                    attempt,
                )
                if attempt > self.settings.worker_max_deliveries:
                    completed = await self._write_final(
                        request,
                        ResultCode.WORKER_LOST,
                        {"error": f"Worker lost; gave up after {attempt - 1} attempts"},
                    )
                    await self._ack(request, completed=completed)
                else:
                    taken.append((request, attempt))
        return taken

    # -- background ------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        while True:
            try:
                await self.store.liveness.heartbeat(self.worker_id, list(self.agents), ttl_ms, self.aliases)
                await self.queue.refresh([job.request for job in self._jobs.values()])
            except BackendUnavailable:
                logger.debug("heartbeat failed; Redis unavailable")
            except BackendCommandError as exc:
                logger.error("heartbeat failed: %s", exc.__cause__)
            await asyncio.sleep(self.settings.worker_heartbeat_interval_s)

    async def _listen_for_cancels(self) -> None:
        backoff = Backoff.for_settings(self.settings)
        while True:
            try:
                await self.queue.watch_cancels(self._cancel_session, on_subscribed=backoff.reset)
            except (BackendUnavailable, BackendCommandError) as exc:
                await asyncio.sleep(backoff.failed(logger, "the cancel subscription", exc))

    def _cancel_session(self, session_id: SessionId) -> None:
        for job in self._jobs.values():
            # An agent that already learned of the cancel from its session is stopping by itself.
            if job.request.session_id == session_id and not job.task.done() and not job.ctx.cancelled:
                job.ctx.cancel()
                job.task.cancel()

    # -- serving -------------------------------------------------------------------

    def _start(self, request: Request, attempt: int) -> None:
        # A retried attempt marks its chunks, so a client can tell a restart.
        stream = self.appender.stream(
            request.session_id, request.agent_id, {"attempt": attempt} if attempt > 1 else {}
        )

        async def was_cancelled() -> bool:
            # The session refused a chunk: its final is in. The client's cancel wrote it
            # when its code says so, whether or not the cancel notice has arrived yet.
            try:
                code = await self.store.result_code(request.session_id, request.agent_id)
            except BackendUnavailable:
                return False
            return code == ResultCode.CANCELLED

        ctx = Context(
            session_id=request.session_id,
            agent_id=request.agent_id,
            appid=request.appid,
            deadline=request.deadline_ms / 1000,
            sink=stream.put,
            was_cancelled=was_cancelled,
            max_chunk_bytes=self.settings.max_chunk_bytes,
            request_fields=request.extra,
        )
        task = asyncio.create_task(self._serve(request, ctx, stream), name=f"serve-{request.session_id}")
        key = (self.queue.stream_of(request), request.message_id)
        self._jobs[key] = _Job(request, ctx, task)
        task.add_done_callback(lambda t: self._served(key, t))

    def _served(self, key: tuple[str, bytes], task: asyncio.Task[None]) -> None:
        self._jobs.pop(key, None)
        self._slot_freed.set()
        self.processed += 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("request handling failed", exc_info=exc)

    async def _drain(self) -> None:
        tasks = {job.task for job in self._jobs.values()}
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.grace_s)
        await cancel_and_wait(pending)

    async def _serve(self, request: Request, ctx: Context, stream: ChunkStream) -> None:
        try:
            completed = await self._judge(request, ctx, stream)
        finally:
            stream.close()
        await self._ack(request, completed=completed)

    async def _judge(self, request: Request, ctx: Context, stream: ChunkStream) -> bool:
        """Run the agent and write its final (unless the session has it); True when that
        final completed the session. Raises when the request must stay for a takeover."""
        session_id_var.set(request.session_id)  # this job's task only, for its logs
        agent = self.agents[request.agent_id]
        remaining_s = (request.deadline_ms - now_ms()) / 1000
        if remaining_s <= 0:
            return False  # the gateway has given it a timeout final already
        code, data = ResultCode.OK, {}
        try:
            async with asyncio.timeout(remaining_s):
                answer = await agent.judge(request.user_input, ctx)
            judgement = answer if isinstance(answer, Judgement) else Judgement(str(answer))
            data = judgement.to_data()
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise  # shutdown: leave the request pending for another worker
            return False  # the gateway wrote the cancelled finals
        except (JudgementClosed, TimeoutError):
            return False  # the session has this agent's final already
        except AgentError as exc:
            code = ResultCode.NO_AGENT if isinstance(exc, AgentUnavailable) else ResultCode.AGENT_ERROR
            data = {"error": str(exc)}
        except Exception:
            logger.exception("agent %s failed on session %s", agent.name, request.session_id)
            code = ResultCode.AGENT_ERROR
            data = {"error": f"Agent '{agent.name}' failed with an internal error"}
        # The final follows the agent's chunks; a deadline passing meanwhile (a Redis
        # outage) is a timeout, whose final the gateway writes.
        if stream.queued or stream.writing:
            try:
                async with asyncio.timeout(max((request.deadline_ms - now_ms()) / 1000, 0)):
                    await stream.drain()
            except TimeoutError:
                return False
        return await self._write_final(request, code, data)

    async def _write_final(self, request: Request, code: ResultCode, data: dict[str, Any]) -> bool:
        """Write the final; True when it completed the session (its deadline is left to ``_ack``)."""
        # Checked before writing: a final that cannot be encoded would fail every delivery
        # of the request alike, and end as result_code 5 after paid retries.
        code, checked = checked_final(request.agent_id, code, data, self.settings.max_final_bytes)
        if checked is not data:
            logger.warning("session %s: %s", request.session_id, checked["error"])
        data = checked
        backoff = Backoff.for_settings(self.settings)
        for _attempt in range(_FINAL_RETRY_LIMIT):
            try:
                result = await self.store.append_final(
                    request.session_id, request.agent_id, code, data, clear_deadline=False
                )
                return result.completed
            except BackendUnavailable as exc:
                # Finals are deduplicated in Redis, so retrying cannot produce two.
                await asyncio.sleep(backoff.failed(logger, "writing a final", exc))
        raise BackendUnavailable("could not write a final; request left for takeover")

    async def _ack(self, request: Request, *, completed: bool = False) -> None:
        """Acknowledge and delete the request: it is done, nobody needs it again. When its
        final completed the session, that session leaves the deadline sweep too."""
        await self.finisher.finish(request, completed=completed)


async def _close_agents(agents: Sequence[Agent]) -> None:
    """``close`` every agent; one failing is logged and does not keep the others open."""
    for agent in agents:
        try:
            await agent.close()
        except Exception:
            logger.exception("closing agent %s failed", agent.name)
