"""Built-in agents: the offline MAGI demo trio, an LLM agent, a synthetic benchmark agent."""

from __future__ import annotations

from magi_gateway.agents.bench import BenchAgent
from magi_gateway.agents.config import AgentsConfigError, load_agents_file
from magi_gateway.agents.demo import DEMO_AGENT_NAMES, DemoAgent, demo_agents
from magi_gateway.agents.llm import LLMAgent, LLMSettings

__all__ = [
    "DEMO_AGENT_NAMES",
    "AgentsConfigError",
    "BenchAgent",
    "DemoAgent",
    "LLMAgent",
    "LLMSettings",
    "demo_agents",
    "load_agents_file",
]
