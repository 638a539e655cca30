"""Identifier types shared by the core, the drivers and the worker SDK."""

from __future__ import annotations

from typing import NewType

__all__ = ["AgentId", "AppId", "ConnectionId", "InstanceId", "SessionId"]

SessionId = NewType("SessionId", str)
AgentId = NewType("AgentId", str)
AppId = NewType("AppId", str)
ConnectionId = NewType("ConnectionId", str)
InstanceId = NewType("InstanceId", str)
