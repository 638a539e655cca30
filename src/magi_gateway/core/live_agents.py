"""Which agents had live workers a moment ago: a judgement for those skips a round trip (sans-I/O).

Opening a judgement needs the live worker count of each requested agent (and of the agents
their aliases name) and the aliases workers declare: one Redis round trip before the
session can be written. Workers come and go in seconds (a worker counts as live
``WORKER_TTL_S`` past its last heartbeat, 10 s by default), while judgements arrive by the
hundred per second, so the gateway keeps each answer ``LIVENESS_CACHE_S`` (1 s) and
reuses it for the same agents. Only answers in which every agent that would answer had a
live worker are kept: an agent without one is always asked about again, so an agent whose
first worker just started is served at once, and ``result_code`` 3 ("no live worker") is
only ever given from a fresh count. What the cache adds is at most ``LIVENESS_CACHE_S``
to the time a stopped agent's last worker still counts as live (its requests then wait
in the agent's stream for a worker until their deadline, as when a worker dies).

Bounded: at most ``MAX_ENTRIES`` sets of agents; a new set beyond it evicts the oldest
(policy: evict-oldest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from magi_gateway.core.ids import AgentId

__all__ = ["MAX_ENTRIES", "LiveAgents", "Liveness"]

#: Distinct sets of requested agents remembered at once.
MAX_ENTRIES = 1024


class Liveness(NamedTuple):
    """What a judgement needs to know of its agents' workers."""

    #: Live worker count per agent asked about.
    live: Mapping[AgentId, int]
    #: Aliases workers declare among the agents asked about: alias -> agent.
    declared: Mapping[str, AgentId]


class LiveAgents:
    """Recent ``Liveness`` answers by the agents asked about, each kept ``ttl_s`` (0: none)."""

    __slots__ = ("_entries", "max_entries", "ttl_s")

    def __init__(self, ttl_s: float, *, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[tuple[AgentId, ...], tuple[float, Liveness]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, agents: Sequence[AgentId], now: float) -> Liveness | None:
        """The answer kept for ``agents``, unless there is none or it is ``ttl_s`` old."""
        key = tuple(agents)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, liveness = entry
        if now >= expires:
            del self._entries[key]
            return None
        return liveness

    def put(
        self, agents: Sequence[AgentId], liveness: Liveness, answering: Sequence[AgentId], now: float
    ) -> None:
        """Keep ``liveness``, the answer for ``agents``, if each of ``answering`` (the agents
        that would answer, after aliases) has a live worker in it; otherwise forget any
        answer kept for ``agents``."""
        key = tuple(agents)
        if self.ttl_s <= 0 or not all(liveness.live.get(agent, 0) > 0 for agent in answering):
            self._entries.pop(key, None)
            return
        self._entries.pop(key, None)  # re-inserted last: the newest is evicted last
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (now + self.ttl_s, liveness)
