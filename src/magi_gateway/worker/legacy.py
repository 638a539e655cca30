"""A bridge for backends of the original Magi system, which speak Redis lists.

The original gateway ``LPUSH``ed each request (the client's message plus ``session_id``)
onto ``queue_agent_judgement``; its backends pushed JSON responses carrying ``session_id``
onto ``queue_agent_judgement_stream`` and ``queue_agent_judgement_final``.
``LegacyBridge`` puts such backends, unchanged, behind the new gateway:

- **Requests.** A ``Worker`` serves the legacy agents (consumer group, heartbeats,
  takeover); each agent pushes the original-format request and hands off: the request is
  acknowledged without a final, which the backend writes. The push goes to the end the
  backends do not pop from, so a backlog is served oldest first (``LPUSH`` + ``BLPOP``
  served it newest first).
- **Responses.** One bridge at a time (a lease) moves responses, oldest first, into a
  processing list, appends each to its session through ``Store`` (the append publishes
  it to the gateway instance owning the session) and only then removes it. Whatever a
  dead bridge had taken is delivered first by the next lease holder. A chunk appended
  just before a crash may be appended again (as across Redis outages); finals are
  exactly once.
- **Order.** Finals move only while the stream list is empty, in the same atomic script:
  a backend pushes a final after its chunks, so they are all ahead of it in the
  processing list, which is delivered strictly in order.
- **Size limits**: a chunk's thinking over ``MAX_CHUNK_BYTES`` is appended as several
  chunks (its other fields with the first); a final over ``MAX_FINAL_BYTES`` becomes
  ``result_code`` 1, as for the SDK's agents.
- **Bad input** (not JSON, no ``session_id``, unknown session or agent) is logged,
  counted in ``dropped`` and skipped; responses the session refuses (after the agent's
  final, e.g. a timeout) are counted in ``refused``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from magi_gateway._tasks import cancel_and_wait
from magi_gateway._util import Backoff
from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.legacy import legacy_request, parse_legacy_response, resolve_agent
from magi_gateway.core.output_limits import checked_final, split_thinking
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.legacy import FINAL_TAG, LegacyLists
from magi_gateway.redis.store import AppendResult, Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent, Context, Judgement, JudgementClosed

__all__ = ["LegacyBridge"]

logger = logging.getLogger(__name__)

_SESSION_CACHE_SIZE = 4096  # sessions whose agents are remembered; overflow: evict the oldest

# -- the bridge ------------------------------------------------------------------------------


class _HandedOff(JudgementClosed):
    """The request is on the legacy list; the backend writes the final, the runner acks."""


class _Forwarder(Agent):
    """Stands in for a legacy agent in the ``Worker``: queues the request for the backend."""

    def __init__(self, name: str, bridge: LegacyBridge) -> None:
        self.name = name
        self._bridge = bridge

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Queue the request in the original format, with the client frame's fields; hand it off."""
        payload = legacy_request(ctx.session_id, ctx.agent_id, user_input, ctx.request_fields)
        await self._bridge.push_request(payload)
        raise _HandedOff(ctx.session_id)


class LegacyBridge:
    """Serves ``agent_ids`` (default ``LEGACY_AGENTS``) through backends of the original system.

    Run it as its own process (or task) next to the gateways; several may run, for
    requests they share the work, for responses one holds the lease and the others wait.
    ``burst=True`` makes ``run`` return once no request and no response is waiting.
    """

    def __init__(
        self,
        agent_ids: Sequence[str] | None = None,
        settings: Settings | None = None,
        *,
        burst: bool = False,
        batch_size: int = 100,
        idle_wait_s: float = 0.05,
        grace_s: float = 5.0,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.burst = burst
        self.batch_size = batch_size
        #: Longest a final waits while no chunk arrives (a blocking wait covers one list only).
        self.idle_wait_s = idle_wait_s
        self.grace_s = grace_s
        self.lists = Keys.legacy(self.settings.legacy_list_prefix)
        # The worker takes requests; its agents are forwarders, so it never writes a final.
        names = self.settings.legacy_agent_list if agent_ids is None else agent_ids
        self.worker = Worker([_Forwarder(a, self) for a in names], self.settings, burst=burst)
        self.agent_ids = frozenset(self.worker.agents)
        self.redis = connect(self.settings, client_name="magi-legacy-bridge")
        self.store = Store(self.redis, Keys(self.settings.redis_key_prefix))
        # Backends use one end of the lists; the bridge the other, so both sides are FIFO.
        self.legacy = LegacyLists(
            self.redis, self.lists, backend_left=self.settings.legacy_backend_end == "left"
        )
        self._holder = self.worker.worker_id
        self._lease_ms = int(self.settings.worker_ttl_s * 1000)
        self._renew_at = 0.0
        self._leader = False
        self._session_agents: dict[SessionId, tuple[AgentId, ...]] = {}
        self._stopping = asyncio.Event()
        # Requests are served concurrently; this keeps their pushes in the order they were read.
        self._push_order = asyncio.Lock()
        #: Responses appended to their session.
        self.relayed = 0
        #: Responses refused by the session: its agent had its final, or it was complete.
        self.refused = 0
        #: Malformed responses skipped, by reason.
        self.dropped: Counter[str] = Counter()

    async def run(self) -> None:
        """Serve requests and relay responses until ``stop`` (or, in burst mode, idle)."""
        tasks = [
            asyncio.create_task(self.worker.run(), name="magi-legacy-requests"),
            asyncio.create_task(self._relay(), name="magi-legacy-responses"),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self.stop()
            await asyncio.wait(tasks, timeout=self.grace_s + self.worker.grace_s)
            await cancel_and_wait(tasks)
            try:
                await self.legacy.release_lease(self._holder)
            except BackendUnavailable:
                logger.warning("could not release the legacy relay lease; it expires by itself")
            await self.redis.aclose()
        for task in tasks:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    def stop(self) -> None:
        """Ask ``run`` to finish: no new requests, the response being delivered completes."""
        self._stopping.set()
        self.worker.stop()

    async def push_request(self, payload: bytes) -> None:
        """Queue a request for the legacy backends, riding out Redis outages."""
        backoff = Backoff.for_settings(self.settings)
        async with self._push_order:
            while True:
                try:
                    await self.legacy.push_request(payload)
                    return
                except BackendUnavailable as exc:
                    # The worker's deadline bounds this; a lost reply may queue it twice.
                    await asyncio.sleep(backoff.failed(logger, "queueing a legacy request", exc))

    # -- responses -------------------------------------------------------------------------

    async def _relay(self) -> None:
        backoff = Backoff.for_settings(self.settings)
        waiting = True  # the processing list may hold responses (a dead bridge's, at first)
        while not self._stopping.is_set():
            try:
                if not await self._hold_lease():
                    waiting = True
                    await self._pause(self.settings.worker_heartbeat_interval_s)
                    continue
                if waiting:
                    await self._deliver_processing()
                waiting = bool(await self._take_batch())
                if not waiting and self.burst:
                    return
                if not waiting:
                    waiting = await self._wait_for_chunk()
            except BackendUnavailable as exc:
                waiting, self._renew_at = True, 0.0
                await self._pause(backoff.failed(logger, "relaying legacy responses", exc))
                continue
            backoff.reset()

    async def _pause(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _hold_lease(self) -> bool:
        """Take or renew the relay lease; False while another bridge holds it."""
        now = time.monotonic()
        if self._leader and now < self._renew_at:
            return True
        held = await self.legacy.hold_lease(self._holder, self._lease_ms)
        if held != self._leader:
            logger.info("%s relaying legacy responses", "now" if held else "no longer")
        self._leader = held
        self._renew_at = now + self.settings.worker_heartbeat_interval_s
        return held

    async def _take_batch(self) -> int:
        """Move up to ``batch_size`` responses into the processing list, in order."""
        return await self.legacy.move_batch(self.batch_size)

    async def _wait_for_chunk(self) -> bool:
        """Block until a chunk arrives (and move it), or ``idle_wait_s`` passes for finals."""
        return await self.legacy.wait_for_chunk(self.idle_wait_s)

    async def _deliver_processing(self) -> None:
        """Deliver the processing list oldest first (its right end), removing each when done."""
        while not self._stopping.is_set():
            entries = await self.legacy.oldest_processing(self.batch_size)
            if not entries:
                return
            for entry in reversed(entries):
                await self._deliver(entry)
                # Only the lease holder pops here, so the right end is still this entry.
                await self.legacy.pop_processing()
                if self._stopping.is_set():
                    return

    async def _deliver(self, entry: bytes) -> None:
        final = entry.startswith(FINAL_TAG)
        raw = entry[len(FINAL_TAG) :] if final else entry
        response = parse_legacy_response(raw, "final" if final else "stream")
        if isinstance(response, str):
            self._drop(response, raw)
            return
        agents = await self._agents_of(response.session_id)
        if agents is None:
            self._drop("unknown_session", raw)
            return
        agent_id = resolve_agent(response.agent_id, agents, self.agent_ids)
        if agent_id is None:
            self._drop("unknown_agent", raw)
            return
        if response.kind == "stream":
            result = await self._append_stream(response.session_id, agent_id, response.data)
        else:
            code, data = checked_final(
                agent_id, response.result_code, response.data, self.settings.max_final_bytes
            )
            result = await self.store.append_final(response.session_id, agent_id, code, data)
        if result.seq is None:
            self.refused += 1
            logger.debug("session %s refused a legacy %s of %s", response.session_id, response.kind, agent_id)
        else:
            self.relayed += 1

    async def _append_stream(
        self, session_id: SessionId, agent_id: AgentId, data: dict[str, Any]
    ) -> AppendResult:
        """Append a chunk, its thinking split at ``MAX_CHUNK_BYTES`` (other fields with the first piece)."""
        thinking = data.get("thinking")
        if not isinstance(thinking, str):
            return await self.store.append_stream(session_id, agent_id, data)
        result = AppendResult(None)
        for index, piece in enumerate(split_thinking(thinking, self.settings.max_chunk_bytes)):
            part = {**data, "thinking": piece} if index == 0 else {"thinking": piece}
            result = await self.store.append_stream(session_id, agent_id, part)
            if result.seq is None:
                break
        return result

    async def _agents_of(self, session_id: SessionId) -> tuple[AgentId, ...] | None:
        """The session's agents (they never change, so they are remembered)."""
        if (known := self._session_agents.get(session_id)) is not None:
            return known
        info = await self.store.session_info(session_id)
        if info is None:
            return None
        if len(self._session_agents) >= _SESSION_CACHE_SIZE:
            del self._session_agents[next(iter(self._session_agents))]
        self._session_agents[session_id] = info.agent_ids
        return info.agent_ids

    def _drop(self, reason: str, raw: bytes) -> None:
        self.dropped[reason] += 1
        logger.warning("dropped a legacy response (%s): %.200r", reason, raw)
