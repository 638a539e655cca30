"""Prometheus metrics of the gateway process (module-level, one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = [
    "AUTH_FAILURES",
    "CLIENT_ERRORS",
    "CONNECTIONS",
    "MESSAGES_OUT",
    "REDIS_RECONNECTS",
    "SESSIONS_STARTED",
]

CONNECTIONS = Gauge("magi_connections", "Open authenticated WebSocket connections")
SESSIONS_STARTED = Counter("magi_sessions_started", "Judgement sessions started")
MESSAGES_OUT = Counter("magi_messages_out", "Session messages queued to clients")
AUTH_FAILURES = Counter("magi_auth_failures", "Rejected WebSocket authentications")
CLIENT_ERRORS = Counter("magi_client_errors", "Error frames sent to clients", ["code"])
REDIS_RECONNECTS = Counter("magi_redis_reconnects", "Notification subscription reconnects")
