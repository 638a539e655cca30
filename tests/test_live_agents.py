"""``core.live_agents``: the liveness answers a gateway reuses for a moment (sans-I/O, synchronous)."""

from __future__ import annotations

from magi_gateway.core.ids import AgentId
from magi_gateway.core.live_agents import LiveAgents, Liveness

A, B, ALIAS = AgentId("melchior"), AgentId("casper"), AgentId("uuid-1")


def test_an_answer_with_every_answering_agent_live_is_kept_for_its_ttl() -> None:
    cache = LiveAgents(1.0)
    answer = Liveness({A: 2, B: 1}, {})
    cache.put([A, B], answer, [A, B], now=10.0)
    assert cache.get([A, B], now=10.5) is answer
    assert cache.get([A, B], now=10.999) is answer
    assert cache.get([B, A], now=10.5) is None  # another order is another request
    assert cache.get([A, B], now=11.0) is None  # expired, and dropped
    assert len(cache) == 0


def test_an_answer_with_an_agent_without_workers_is_never_kept() -> None:
    cache = LiveAgents(1.0)
    cache.put([A, B], Liveness({A: 2, B: 0}, {}), [A, B], now=0.0)
    assert cache.get([A, B], now=0.1) is None
    # A kept answer is forgotten when a fresh one finds an agent without a worker.
    cache.put([A], Liveness({A: 1}, {}), [A], now=0.0)
    cache.put([A], Liveness({A: 0}, {}), [A], now=0.2)
    assert cache.get([A], now=0.3) is None


def test_an_alias_counts_by_the_agent_that_answers_for_it() -> None:
    cache = LiveAgents(1.0)
    # ALIAS has no worker of its own; its agent B answers for it and is live.
    answer = Liveness({ALIAS: 0, B: 3}, {"uuid-1": B})
    cache.put([ALIAS, B], answer, [B], now=0.0)
    assert cache.get([ALIAS, B], now=0.5) is answer


def test_a_zero_ttl_keeps_nothing() -> None:
    cache = LiveAgents(0)
    cache.put([A], Liveness({A: 1}, {}), [A], now=0.0)
    assert cache.get([A], now=0.0) is None
    assert len(cache) == 0


def test_the_oldest_set_of_agents_is_evicted_beyond_the_bound() -> None:
    cache = LiveAgents(10.0, max_entries=3)
    for i in range(3):
        agent = AgentId(f"agent-{i}")
        cache.put([agent], Liveness({agent: 1}, {}), [agent], now=float(i))
    # Refreshing agent-0 makes it the newest: agent-1 goes first.
    cache.put([AgentId("agent-0")], Liveness({AgentId("agent-0"): 1}, {}), [AgentId("agent-0")], now=3.0)
    cache.put([A], Liveness({A: 1}, {}), [A], now=4.0)
    assert len(cache) == 3
    assert cache.get([AgentId("agent-1")], now=4.0) is None
    assert cache.get([AgentId("agent-0")], now=4.0) is not None
    assert cache.get([AgentId("agent-2")], now=4.0) is not None
    assert cache.get([A], now=4.0) is not None
