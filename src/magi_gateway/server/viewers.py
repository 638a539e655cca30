"""Keeping this instance's viewers registered: the lease renewal loop (see ``redis.viewers``).

Every third of ``VIEWER_LEASE_S`` the leases of every viewer here are extended, so the
append scripts keep notifying this instance while it lives, and stop soon after it dies.
A viewer dropped meanwhile (this instance could not reach Redis for longer than the
lease, and another's ``join`` pruned it) is registered again and replays from its
cursor: messages logged while it was dropped were not published here. A viewer whose
session expired is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from magi_gateway._util import Backoff
from magi_gateway.core.errors import BackendCommandError, BackendUnavailable
from magi_gateway.server.delivery import Delivery

__all__ = ["renew_viewers"]

logger = logging.getLogger(__name__)

_READDED, _GONE = 1, -1


async def renew_viewers(delivery: Delivery, lease_s: float, backoff: Callable[[], Backoff]) -> None:
    """Renew this instance's viewers' leases, forever."""
    retry = backoff()
    lease_ms = int(lease_s * 1000)
    delay = lease_s / 3
    while True:
        await asyncio.sleep(delay)
        viewers = [session for session in delivery.viewers() if session.registered]
        delay = lease_s / 3
        if not viewers:
            continue
        try:
            codes = await delivery.store.viewers.renew(
                delivery.instance_id, [(v.id, v.connection.id) for v in viewers], lease_ms
            )
        except BackendUnavailable as exc:
            delay = min(retry.failed(logger, "viewer lease renewal", exc), delay)
            continue
        except BackendCommandError as exc:
            logger.error("viewer lease renewal failed: %s", exc.__cause__)
            delay = min(retry.next_delay(), delay)
            continue
        except Exception:
            # A defect in one round must not end every viewer's lease: logged, tried again.
            logger.exception("viewer lease renewal failed")
            delay = min(retry.next_delay(), delay)
            continue
        retry.reset()
        for session, code in zip(viewers, codes, strict=True):
            if code == _READDED:
                delivery.replay(session)
            elif code == _GONE:
                delivery.untrack(session)
