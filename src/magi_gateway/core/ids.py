"""Identifier types shared by the core, the drivers and the worker SDK."""

from __future__ import annotations

import re
from typing import NewType, TypeGuard

__all__ = ["AgentId", "AppId", "ConnectionId", "InstanceId", "SessionId", "is_session_id"]

SessionId = NewType("SessionId", str)
AgentId = NewType("AgentId", str)
AppId = NewType("AppId", str)
ConnectionId = NewType("ConnectionId", str)
InstanceId = NewType("InstanceId", str)

#: What ``core.session.new_session_id`` makes: 32 lowercase hex characters.
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def is_session_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` has the form of a session id (from a client or a backend: never trusted)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None
