"""Magi Gateway: real-time WebSocket access to AI agent workers, over Redis.

The public API here is the worker SDK: write an agent, run it with ``Worker``.
"""

from __future__ import annotations

from magi_gateway.core.errors import (
    AgentError,
    AuthenticationFailed,
    BackendUnavailable,
    GatewayError,
    ProtocolError,
    SessionNotFound,
)
from magi_gateway.core.session import ResultCode, compute_verdict
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent, Context, FunctionAgent, Judgement, JudgementClosed, agent

__all__ = [
    "Agent",
    "AgentError",
    "AuthenticationFailed",
    "BackendUnavailable",
    "Context",
    "FunctionAgent",
    "GatewayError",
    "Judgement",
    "JudgementClosed",
    "ProtocolError",
    "ResultCode",
    "SessionNotFound",
    "Settings",
    "Worker",
    "__version__",
    "agent",
    "compute_verdict",
]

__version__ = "0.1.0"
