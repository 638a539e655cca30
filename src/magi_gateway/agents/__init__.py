"""Built-in agents: the offline MAGI demo trio, an LLM agent, a synthetic benchmark agent."""

from __future__ import annotations

from .bench import BenchAgent
from .config import AgentsConfigError, load_agents_file
from .demo import DEMO_AGENT_NAMES, DemoAgent, demo_agents
from .llm import LLMAgent, LLMSettings

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
