"""The deadline sweep every gateway instance runs over the shared deadline set.

Agents still pending at their session's deadline get a ``result_code`` 2 final, even
when the instance that started the session is gone. A session leaves the set only
once handled, so an instance dying mid-sweep leaves it to the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from magi_gateway._util import Backoff, now_ms
from magi_gateway.core.errors import BackendUnavailable
from magi_gateway.core.session import ResultCode
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
            for session_id in await store.due_sessions(now()):
                info = await store.session_info(session_id)
                if info is not None and not info.completed:
                    await store.finish_pending(info, ResultCode.TIMEOUT, {"error": error})
                    # Also a session whose last final was logged but not its completion.
                    await store.complete_if_done(session_id)
                await store.clear_deadline(session_id)
            retry.reset()
            await asyncio.sleep(SWEEP_INTERVAL_S)
        except BackendUnavailable as exc:
            await asyncio.sleep(retry.failed(logger, "deadline sweep", exc))
