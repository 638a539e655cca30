"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

logger = logging.getLogger(__name__)

_RECANCEL_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again until they end or time runs out.

    One cancel is not always enough on Python 3.11: ``asyncio.wait_for``/``timeout``
    (used inside redis-py) can swallow a cancellation that arrives as the awaited
    operation completes, and a ``while True`` loop then carries on.
    """
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, deadline - loop.time()))
    for task in pending:
        logger.error("task %s did not stop", task.get_name())
