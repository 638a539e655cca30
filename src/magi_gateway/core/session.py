"""Session bookkeeping, sans-I/O: result codes, verdicts, and in-order delivery.

A session's messages carry a ``seq`` that starts at 1 and grows by one. The log in
Redis is the truth; ``DeliveryCursor`` decides, for each message a connection is
offered (live notification or replayed log entry), whether to send it, drop it as
already sent, or first fetch a gap from the log.
"""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from magi_gateway.core.ids import AgentId, SessionId

__all__ = [
    "DECISIONS",
    "DeliveryCursor",
    "Gap",
    "JudgementPlan",
    "ResultCode",
    "compute_verdict",
    "new_session_id",
    "normalize_decision",
    "plan_judgement",
]

#: Decisions an agent may give; anything else is recorded as no decision.
DECISIONS = ("approve", "reject", "abstain")


class ResultCode(enum.IntEnum):
    """``result_code`` of ``agent_judgement_final``."""

    OK = 0
    AGENT_ERROR = 1
    TIMEOUT = 2
    NO_AGENT = 3
    CANCELLED = 4
    WORKER_LOST = 5


def new_session_id() -> SessionId:
    """A fresh, unguessable session id (32 lowercase hex characters)."""
    return SessionId(uuid.uuid4().hex)


def normalize_decision(value: object) -> str | None:
    """``approve``/``reject``/``abstain`` (case-insensitive), else None."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in DECISIONS:
            return lowered
    return None


def compute_verdict(decisions: Iterable[str | None]) -> str:
    """Majority of the decisions given; a tie, or no decision at all, is ``abstain``.

    Agents that gave no decision (failed, timed out, cancelled) do not vote.
    """
    counts = Counter(d for d in decisions if d in DECISIONS)
    if not counts:
        return "abstain"
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return "abstain"
    return ranked[0][0]


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first..last`` (inclusive) must be read from the log before going on."""

    first: int
    last: int


class DeliveryCursor:
    """Tracks the last seq sent to a client, so it gets each message once, in order."""

    __slots__ = ("last_seq",)

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq

    def offer(self, seq: int) -> bool | Gap:
        """True: send now. False: already sent. ``Gap``: fetch the missing range first."""
        if seq <= self.last_seq:
            return False
        if seq == self.last_seq + 1:
            return True
        return Gap(self.last_seq + 1, seq - 1)

    def sent(self, seq: int) -> None:
        """Record that ``seq`` was handed to the client."""
        if seq > self.last_seq:
            self.last_seq = seq


@dataclass(frozen=True, slots=True)
class JudgementPlan:
    """What opening a judgement does once its session is logged, in this order.

    First the requests of the agents that have live workers are queued, then the
    agents nobody serves get their ``result_code`` 3 finals: the last final writes the
    completion, so it must come after every request is queued (else a session whose
    served agents answer fast could complete before the others are even asked).
    """

    queue: tuple[AgentId, ...]
    no_worker: tuple[AgentId, ...]


def plan_judgement(agent_ids: Iterable[AgentId], live_workers: Mapping[AgentId, int]) -> JudgementPlan:
    """Split a judgement's agents into those to queue and those without a live worker."""
    agents = tuple(agent_ids)
    return JudgementPlan(
        queue=tuple(a for a in agents if live_workers.get(a, 0) > 0),
        no_worker=tuple(a for a in agents if live_workers.get(a, 0) == 0),
    )
