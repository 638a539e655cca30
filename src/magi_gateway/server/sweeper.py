"""The deadline sweep every gateway instance runs over the shared deadline set.

Agents still pending at their session's deadline get a ``result_code`` 2 final, even
when the instance that started the session is gone. A session leaves the set only
once handled, so an instance dying mid-sweep leaves it to the others.

The same loop repairs intakes (``redis.intake``): a session whose requests were never
queued (its gateway failed or died between creating it and queueing them) has them
queued here, and its agents without a live worker get their ``result_code`` 3 final.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from magi_gateway._util import Backoff, now_ms
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.core.ids import SessionId
from magi_gateway.core.session import ResultCode
from magi_gateway.redis.intake import PendingIntake
from magi_gateway.redis.store import Store

__all__ = ["SWEEP_INTERVAL_S", "sweep_deadlines"]

logger = logging.getLogger(__name__)

#: How often each instance looks for sessions past their deadline.
SWEEP_INTERVAL_S = 0.2


async def sweep_deadlines(
    store: Store, timeout_s: float, backoff: Callable[[], Backoff], *, now: Callable[[], int] = now_ms
) -> None:
    """Give agents still pending at their session's deadline a timeout final, forever.

    ``now`` is the clock in milliseconds (tests move it forward).
    """
    retry = backoff()
    error = f"Agent did not answer within {timeout_s:g}s"
    while True:
        try:
            await repair_intakes(store, now())
            for session_id in await store.deadlines.due(now()):
                try:
                    await _time_out(store, session_id, error)
                except BackendCommandError as exc:
                    # Retrying cannot help (bad data under the session's keys): move on.
                    logger.error("could not time out session %s: %s", session_id, exc.__cause__)
                await store.deadlines.clear(session_id)
            retry.reset()
            await asyncio.sleep(SWEEP_INTERVAL_S)
        except BackendUnavailable as exc:
            await asyncio.sleep(retry.failed(logger, "deadline sweep", exc))
        except BackendCommandError as exc:
            logger.error("deadline sweep failed: %s", exc.__cause__)
            await asyncio.sleep(retry.next_delay())


async def _time_out(store: Store, session_id: SessionId, error: str) -> None:
    info = await store.session_info(session_id)
    if info is not None and not info.completed:
        await store.finish_pending(info, ResultCode.TIMEOUT, {"error": error})
        # Also a session whose last final was logged but not its completion.
        await store.complete_if_done(session_id)


async def repair_intakes(store: Store, now: int) -> None:
    """Queue the requests of sessions whose opening gateway did not (see ``redis.intake``)."""
    drop: list[SessionId] = []
    for intake in await store.intake.due(now):
        try:
            await _repair(store, intake, now, drop)
        except BackendCommandError as exc:
            logger.error("could not queue the requests of session %s: %s", intake.session_id, exc.__cause__)
            drop.append(intake.session_id)  # the deadline sweep answers its agents
    await store.intake.drop(drop)


async def _repair(store: Store, intake: PendingIntake, now: int, drop: list[SessionId]) -> None:
    info = await store.session_info(intake.session_id)
    if info is None:
        if now < intake.deadline_ms:
            await store.intake.postpone(intake.session_id, now)  # maybe not created yet
        else:
            drop.append(intake.session_id)
        return
    if info.completed:
        drop.append(intake.session_id)
        return
    queue = tuple(a for a in intake.agent_ids if a in info.pending)
    queued = await store.intake.enqueue(
        PendingIntake(
            intake.session_id, intake.appid, queue, intake.user_input, intake.deadline_ms, intake.extra
        )
    )
    if not queued:
        return  # its gateway got there meanwhile
    logger.warning("queued the requests of session %s (its gateway did not)", intake.session_id)
    for agent_id in info.agent_ids:
        if agent_id in info.pending and agent_id not in intake.agent_ids:
            await store.append_final(
                intake.session_id,
                agent_id,
                ResultCode.NO_AGENT,
                {"error": f"No live worker serves agent '{agent_id}'"},
            )
