"""A bridge for pub/sub-era backends of the original Magi system.

The original gateway ``PUBLISH``ed each client frame plus ``session_id`` on
``gateway:requests:{session_id}``; its backends (a listener on ``PSUBSCRIBE
gateway:requests:*``) answered on ``gateway:responses:{session_id}`` with ``agent_response``
messages (``core.pubsub_era``). ``PubSubBridge`` puts such backends, unchanged, behind
the new gateway:

- **Requests.** A ``Worker`` serves the bridged agents (consumer group, heartbeats,
  takeover): each request is published, for its one agent, in the original form with the
  client frame's other fields and ``agents: [{"agent_id": AGENT}]``, which those backends
  read (``core.legacy.legacy_request``). A publish that reaches
  no subscriber is ``result_code`` 3 at once.
- **Responses.** One ``PSUBSCRIBE gateway:responses:*`` per bridge, in place before the
  bridge takes its first request; each message goes to the request it answers (by
  session and agent; a message naming no agent, to the session's only one here). The
  request turns them into the session's messages like any agent: ``streaming`` content is
  thinking (``ctx.think``), ``completed`` the final, its ``judgement`` the concatenated
  content and its ``decision`` the last ``<decision>`` tag (none: ``abstain``);
  ``error``, and ``agent_judgement_response`` errors, a ``result_code`` 1 final.
  Messages for requests this bridge is not serving (another bridge's, or late) are
  counted in ``unrouted``; malformed ones are logged and counted in ``dropped``.
- **Loss.** Pub/sub keeps nothing: a response published while no bridge listens (down,
  reconnecting) is gone, as in the original system; its agent then ends by the session's
  deadline (``result_code`` 2), or, if the bridge serving it died, another bridge takes
  the request over after ``WORKER_CLAIM_IDLE_S`` and publishes it again. What reaches the
  bridge is logged exactly once, in order, under the session's seqs.
- **Bounds.** Per request, at most ``max_buffered`` chunks wait to be logged (overflow:
  the chunk is dropped, counted in ``dropped["overflow"]``); the judgement keeps at most
  half of ``MAX_FINAL_BYTES`` of text (``VerdictText``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Sequence

from magi_gateway._tasks import cancel_and_wait
from magi_gateway._util import Backoff
from magi_gateway.core.errors import AgentError, BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import AgentId, SessionId
from magi_gateway.core.legacy import legacy_request
from magi_gateway.core.pubsub_era import OriginalResponse, VerdictText, parse_original_response
from magi_gateway.redis.client import connect
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.pubsub_era import PubSubChannels
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent, AgentUnavailable, Context, Judgement

__all__ = ["PubSubBridge"]

logger = logging.getLogger(__name__)


class _Awaited:
    """The responses of one request, as the subscription hands them over."""

    __slots__ = ("chunks", "end", "wake")

    def __init__(self) -> None:
        self.chunks: deque[str] = deque()
        self.end: OriginalResponse | None = None
        self.wake = asyncio.Event()


class _Publisher(Agent):
    """Stands in for a pub/sub-era agent in the ``Worker``: publishes, then relays the answers."""

    def __init__(self, name: str, bridge: PubSubBridge) -> None:
        self.name = name
        self._bridge = bridge

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Publish the request, stream the backend's content, return its verdict."""
        return await self._bridge.serve(user_input, ctx)


class PubSubBridge:
    """Serves ``agent_ids`` (default ``PUBSUB_AGENTS``) through pub/sub-era backends.

    Run it as its own process (or task) next to the gateways; several may run (each
    request is served by one, every bridge hears every response and keeps its own).
    ``burst=True`` makes ``run`` return once no request is waiting or running.
    """

    def __init__(
        self,
        agent_ids: Sequence[str] | None = None,
        settings: Settings | None = None,
        *,
        burst: bool = False,
        max_buffered: int = 1024,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.max_buffered = max_buffered
        names = self.settings.pubsub_agent_list if agent_ids is None else agent_ids
        self.worker = Worker([_Publisher(a, self) for a in names], self.settings, burst=burst)
        self.agent_ids = frozenset(self.worker.agents)
        self.redis = connect(self.settings, client_name="magi-pubsub-bridge")
        self.channels = PubSubChannels(self.redis, Keys.pubsub(self.settings.pubsub_channel_prefix))
        self._awaited: dict[SessionId, dict[AgentId, _Awaited]] = {}
        self._subscribed = asyncio.Event()
        self._stopping = asyncio.Event()
        #: Responses handed to the request they answer.
        self.routed = 0
        #: Responses for no request this bridge is serving (another bridge's, or too late).
        self.unrouted = 0
        #: Messages skipped, by reason (malformed, not a judgement's, over the buffer).
        self.dropped: Counter[str] = Counter()

    async def run(self) -> None:
        """Subscribe to the responses, then serve requests until ``stop`` (or idle, in burst mode)."""
        listener = asyncio.create_task(self._listen(), name="magi-pubsub-responses")
        try:
            # No request is taken before the subscription is in place: its answer would be lost.
            waits = [asyncio.ensure_future(e.wait()) for e in (self._subscribed, self._stopping)]
            await asyncio.wait({listener, *waits}, return_when=asyncio.FIRST_COMPLETED)
            await cancel_and_wait(waits)
            if listener.done():
                listener.result()  # it only ends by raising
            if not self._stopping.is_set():
                await self.worker.run()
        finally:
            await cancel_and_wait([listener])
            await self.redis.aclose()

    def stop(self) -> None:
        """Ask ``run`` to finish: no new requests, running ones get the worker's grace."""
        self._stopping.set()
        self.worker.stop()

    # -- requests ---------------------------------------------------------------------------

    async def serve(self, user_input: str, ctx: Context) -> Judgement:
        """One request: publish it, then relay its answers until ``completed`` or ``error``."""
        session_id, agent_id = ctx.session_id, ctx.agent_id
        awaited = _Awaited()
        # Registered before publishing: the answer may arrive before PUBLISH returns.
        self._awaited.setdefault(session_id, {})[agent_id] = awaited
        try:
            payload = legacy_request(session_id, agent_id, user_input, ctx.request_fields, agents_list=True)
            if await self._publish(session_id, payload) == 0:
                channel = self.channels.keys.request_channel(session_id)
                raise AgentUnavailable(f"No backend received the request (nobody subscribes to {channel})")
            text = VerdictText(self.settings.max_final_bytes // 2)
            while True:
                while awaited.chunks:
                    piece = awaited.chunks.popleft()
                    text.add(piece)
                    await ctx.think(piece)
                if (end := awaited.end) is not None:
                    if end.status == "error":
                        raise AgentError(end.error or "The agent reported an error")
                    extra = {"truncated": True} if text.truncated else {}
                    return Judgement(text.text, decision=text.decision, extra=extra)
                awaited.wake.clear()
                await awaited.wake.wait()
        finally:
            mine = self._awaited.get(session_id, {})
            mine.pop(agent_id, None)
            if not mine:
                self._awaited.pop(session_id, None)

    async def _publish(self, session_id: SessionId, payload: bytes) -> int:
        """Publish, riding out Redis outages (the worker's deadline bounds this)."""
        backoff = Backoff.for_settings(self.settings)
        while True:
            try:
                return await self.channels.publish_request(session_id, payload)
            except BackendUnavailable as exc:
                await asyncio.sleep(backoff.failed(logger, "publishing a request", exc))

    # -- responses --------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff.for_settings(self.settings)

        def subscribed() -> None:
            backoff.reset()
            self._subscribed.set()

        while True:
            try:
                await self.channels.watch_responses(self._on_response, on_subscribed=subscribed)
            except (BackendUnavailable, BackendCommandError) as exc:
                # Responses published until the next subscription are lost (see the docstring).
                await asyncio.sleep(backoff.failed(logger, "the response subscription", exc))

    def _on_response(self, channel_session: str | None, raw: bytes) -> None:
        response = parse_original_response(raw, channel_session)
        if isinstance(response, str):
            self._drop(response, raw)
            return
        for awaited in self._targets(response):
            self.routed += 1
            if response.content and len(awaited.chunks) >= self.max_buffered:
                self._drop("overflow", raw)
            elif response.content and awaited.end is None:
                awaited.chunks.append(response.content)  # a completed's content comes first
            if response.status in ("completed", "error") and awaited.end is None:
                awaited.end = response
            awaited.wake.set()

    def _targets(self, response: OriginalResponse) -> list[_Awaited]:
        """The requests a response is for: its agent's, or the session's only one here."""
        mine = self._awaited.get(response.session_id)
        if mine and response.whole_request:
            return list(mine.values())
        named = AgentId(response.agent_id) if response.agent_id is not None else None
        if mine and named in mine:
            return [mine[named]]
        if mine and named is None and len(mine) == 1:
            return list(mine.values())
        self.unrouted += 1
        return []

    def _drop(self, reason: str, raw: bytes) -> None:
        self.dropped[reason] += 1
        if reason == "other_type":
            logger.debug("ignored a pub/sub-era message: %.200r", raw)
        else:
            logger.warning("dropped a pub/sub-era response (%s): %.200r", reason, raw)
