"""Prometheus metrics of the gateway process (module-level, one registry per process).

Counters and histograms are updated where things happen. The gauges that describe
Redis (sessions running across all instances, each agent's queue) are refreshed from
Redis by ``Gateway.refresh_metrics`` when ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AGENT_PENDING",
    "AGENT_QUEUE_LAG",
    "AGENT_WORKERS",
    "AUTH_FAILURES",
    "BAD_FRAMES",
    "BYTES_IN",
    "BYTES_OUT",
    "CLIENT_ERRORS",
    "CONNECTIONS",
    "EDGE_REFUSALS",
    "MESSAGES_IN",
    "MESSAGES_OUT",
    "REDIS_ERRORS",
    "REDIS_RECONNECTS",
    "RESUMES",
    "SESSIONS",
    "SESSIONS_COMPLETED",
    "SESSIONS_STARTED",
    "SSE_STREAMS",
    "SSE_STREAMS_DROPPED",
    "TIME_TO_FINAL",
    "TIME_TO_FIRST_CHUNK",
    "count_out",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

CONNECTIONS = Gauge("magi_connections", "Open authenticated WebSocket connections")
SSE_STREAMS = Gauge("magi_sse_streams", "Open /v1 event streams")
SSE_STREAMS_DROPPED = Counter("magi_sse_streams_dropped", "Event streams dropped: the client stopped reading")
SESSIONS = Gauge(
    "magi_sessions",
    "Sessions by state: running (all instances, from Redis), delivering (attached here)",
    ["state"],
)
SESSIONS_STARTED = Counter("magi_sessions_started", "Judgement sessions started on this instance")
SESSIONS_COMPLETED = Counter(
    "magi_sessions_completed", "Sessions started on this instance whose complete reached the client here"
)
MESSAGES_IN = Counter("magi_messages_in", "Client frames received, by type", ["type"])
MESSAGES_OUT = Counter("magi_messages_out", "Messages queued to clients, by type", ["type"])
BYTES_IN = Counter("magi_bytes_in", "Bytes of client frames received")
BYTES_OUT = Counter("magi_bytes_out", "Bytes of messages queued to clients")
TIME_TO_FIRST_CHUNK = Histogram(
    "magi_time_to_first_chunk_seconds",
    "From agent_judgement to the session's first agent_judgement_stream (sessions started here)",
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FINAL = Histogram(
    "magi_time_to_final_seconds",
    "From agent_judgement to each agent_judgement_final (sessions started here)",
    buckets=_LATENCY_BUCKETS,
)
RESUMES = Counter(
    "magi_resumes", "Resume requests, by outcome (ok, not_found, too_many_viewers, error)", ["outcome"]
)
AUTH_FAILURES = Counter("magi_auth_failures", "Rejected WebSocket authentications, by reason", ["reason"])
EDGE_REFUSALS = Counter(
    "magi_edge_refusals",
    "Connections closed before a request: handshake timeout, oversized head (431), MAX_CONNECTIONS (503)",
    ["reason"],
)
CLIENT_ERRORS = Counter("magi_client_errors", "Error frames sent to clients", ["code"])
BAD_FRAMES = Counter("magi_bad_frames", "Frames from Redis skipped because they are not UTF-8 text")
REDIS_RECONNECTS = Counter("magi_redis_reconnects", "Notification subscription reconnects")
REDIS_ERRORS = Counter("magi_redis_errors", "Redis reads for a /metrics scrape that failed or timed out")
AGENT_QUEUE_LAG = Gauge(
    "magi_agent_queue_lag", "Requests in an agent's stream not yet read by any worker", ["agent"]
)
AGENT_PENDING = Gauge("magi_agent_pending", "Requests read by a worker and not yet finished", ["agent"])
AGENT_WORKERS = Gauge("magi_agent_workers", "Live workers serving an agent", ["agent"])

_MAX_TYPES = 32
#: Messages and bytes queued per type since the last scrape: [count, bytes].
_PENDING_OUT: dict[bytes, list[int]] = {}


def count_out_run(kind: bytes, count: int, size: int) -> None:
    """``count_out`` for ``count`` frames of one ``kind``, ``size`` bytes in all."""
    pending = _PENDING_OUT.get(kind)
    if pending is None:
        if len(_PENDING_OUT) >= _MAX_TYPES:
            kind = b"other"
        pending = _PENDING_OUT.setdefault(kind, [0, 0])
    pending[0] += count
    pending[1] += size


def count_out(frame: bytes, kind: bytes) -> None:
    """Count one message of type ``kind`` queued to a client (error frames count as ``error``).

    The hot path: a dict update per frame; ``publish_counts`` adds the sums to the
    Prometheus counters at each scrape (two ``Counter.inc`` per frame cost more than the
    rest of handing the frame over). The types are bounded: past ``_MAX_TYPES`` a type
    counts as "other".
    """
    pending = _PENDING_OUT.get(kind)
    if pending is None:
        if len(_PENDING_OUT) >= _MAX_TYPES:
            kind = b"other"
        pending = _PENDING_OUT.setdefault(kind, [0, 0])
    pending[0] += 1
    pending[1] += len(frame)


def publish_counts() -> None:
    """Add what ``count_out`` summed to ``magi_messages_out_total`` and ``magi_bytes_out_total``."""
    for kind, pending in _PENDING_OUT.items():
        count, size = pending
        if count:
            pending[0] = pending[1] = 0
            MESSAGES_OUT.labels(kind.decode()).inc(count)
            BYTES_OUT.inc(size)
