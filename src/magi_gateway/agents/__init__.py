"""Built-in agents: the offline MAGI demo trio and a synthetic benchmark agent."""

from __future__ import annotations

from .bench import BenchAgent
from .demo import DEMO_AGENT_NAMES, DemoAgent, demo_agents

__all__ = ["DEMO_AGENT_NAMES", "BenchAgent", "DemoAgent", "demo_agents"]
