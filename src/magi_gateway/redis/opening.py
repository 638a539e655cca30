"""A session's opening in one round trip, on one Redis server (not a Cluster).

Before it, unless the gateway knows the agents live (``core.live_agents``), one round trip
counts their workers (``claim_and_count``); on a Cluster it claims the request_id too.
On one server the admission claims it (``admit.lua``), in the opening's round trip.

Opening a session takes three scripts: ``admit.lua`` (the appid's limits, the deadline
and the intake mark, in the deployment's slot), ``append.lua`` in ``create`` mode (the
session's keys and its ``agent_judgement_accepted``, in the session's slot) and
``enqueue.lua`` (the requests, in the agents' streams). A Cluster runs them one after
the other: each on its own slot's node. One server takes them
pipelined, each guarded by the step before, so the three cost one round trip, shared
with the openings of other judgements made meanwhile (``Intake.openings``, a
``redis.coalesce.CoalescedPipeline``: in a profile at saturation a third of the
gateway's samples were its judgements, more than half of that in redis-py's pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from magi_gateway.core.ids import AgentId, AppId, SessionId
from magi_gateway.redis.client import RedisClient, redis_errors
from magi_gateway.redis.idempotency import RequestIds
from magi_gateway.redis.intake import AppLimits, Intake, PendingIntake
from magi_gateway.redis.liveness import Liveness

__all__ = ["claim_and_count", "claims_in_admission", "open_session"]


def claims_in_admission(redis: RedisClient) -> bool:
    """Whether a request_id is claimed in the admission (``admit.lua``'s ``request`` key):
    on one server; a Cluster keeps its key in another slot and claims it beforehand."""
    return not isinstance(redis, RedisCluster)


async def claim_and_count(
    redis: RedisClient,
    request_ids: RequestIds,
    liveness: Liveness,
    appid: AppId,
    request_id: str | None,
    sid: SessionId,
    ttl_ms: int,
    agents: Sequence[AgentId],
) -> tuple[SessionId | None, dict[AgentId, int], dict[str, AgentId]]:
    """The round trip before the opening, pipelined: ``request_ids.claim`` (given a
    ``request_id``: the session it names already, if any), the live worker counts of
    ``agents`` and the aliases workers declare among them."""
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            if request_id is not None:
                request_ids.queue_claim(pipe, appid, request_id, sid, ttl_ms)
            liveness.queue_aliases(pipe, agents)
            liveness.queue_counts(pipe, agents)
            replies = await pipe.execute()
    existing = request_ids.claimed(replies) if request_id is not None else None
    declared = liveness.aliases(agents, replies[-len(agents) - 1])
    return existing, liveness.counts(agents, replies), declared


async def open_session(
    redis: RedisClient,
    intake_ops: Intake,
    append: AsyncScript,
    admission: tuple[list[str], list[Any]],
    keys: tuple[list[str], str],
    argv: list[Any],
    intake: PendingIntake | None,
    limits: AppLimits,
) -> tuple[list[Any], bool]:
    """Admit the session (``admission``: ``Intake.admit_call``'s), create it (``keys``: the
    session's and the deadlines key; ``argv``: ``append.lua``'s in ``create`` mode) and,
    given ``intake``, queue its requests: the creating script's reply, and whether they
    were queued. On one server in one round trip; on a Cluster one step after the other
    (the deadline set is one key for all sessions, not in the session's hash slot)."""
    session_keys, deadlines = keys
    if intake is not None and not isinstance(redis, RedisCluster):
        return await _in_one_round_trip(
            intake_ops, append, admission, [*session_keys, deadlines], argv, intake, limits
        )
    intake_ops.check_admitted(await intake_ops.run_admit(*admission), limits)
    with redis_errors():
        reply: list[Any] = await append(keys=session_keys, args=argv)
    return reply, False


async def _in_one_round_trip(
    intake_ops: Intake,
    append: AsyncScript,
    admission: tuple[list[str], list[Any]],
    guarded_keys: list[str],
    argv: list[Any],
    intake: PendingIntake,
    limits: AppLimits,
) -> tuple[list[Any], bool]:
    """Admit, create and enqueue, pipelined: the creating script's reply, and whether the
    requests were queued.

    The creation is guarded by the admission's deadline entry (``guarded_keys`` ends with
    the deadlines key: without the session's entry it writes nothing, -7) and the enqueue
    by the intake mark (written by the admission), in this order on one connection: nothing
    is written past a refusal (``TooManySessions``, ``RateLimited`` are raised), and no
    worker sees a request before its session exists. A script the server lacks (NOSCRIPT:
    a new or restarted server) is run again through its ``Script``, which loads it; an
    enqueue left undone is the caller's (``intake.enqueue``). (If the admission and the
    enqueue ran but the creation met NOSCRIPT, the requests are queued the moment before
    their session exists: an agent's first write may find none and its session then
    times out. It takes another instance loading two scripts between two commands of
    this pipeline.)
    """
    admit_keys, admit_args = admission
    queue_keys, queue_args = intake_ops.enqueue_call(intake)
    with redis_errors():
        admitted, reply, queued = await intake_ops.openings(
            [
                ("EVALSHA", intake_ops.admit_sha, len(admit_keys), *admit_keys, *admit_args),
                ("EVALSHA", append.sha, len(guarded_keys), *guarded_keys, *argv),
                ("EVALSHA", intake_ops.enqueue_sha, len(queue_keys), *queue_keys, *queue_args),
            ]
        )
        if isinstance(admitted, NoScriptError):  # nothing admitted: the guards wrote nothing
            intake_ops.check_admitted(await intake_ops.run_admit(admit_keys, admit_args), limits)
            created: list[Any] = await append(keys=guarded_keys, args=argv)
            return created, False
        for outcome in (admitted, reply):
            if isinstance(outcome, Exception) and not isinstance(outcome, NoScriptError):
                raise outcome
        intake_ops.check_admitted(admitted, limits)
        if isinstance(reply, NoScriptError):
            reply = await append(keys=guarded_keys, args=argv)
    return reply, queued == 1
