"""Settings: one immutable object, built once from the environment and ``.env``.

Variable names are the field names upper-cased (``REDIS_HOST``, ``JUDGEMENT_TIMEOUT_S``).
The original service's names (``DEBUG HOST PORT REDIS_HOST REDIS_PORT REDIS_DB
REDIS_PASSWORD FIXED_SECRET CORS_ORIGINS``) keep working; ``REDIS_URL`` wins over the
``REDIS_*`` parts when set. Units are part of the names. The original gateway's own
names are aliases: ``GATEWAY_HOST GATEWAY_PORT GATEWAY_CORS_ORIGINS GATEWAY_REDIS_HOST
GATEWAY_REDIS_PORT GATEWAY_REDIS_DB GATEWAY_REDIS_PASSWORD GATEWAY_SECRET`` (the
canonical name wins when both are set).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from magi_gateway.core.dialect import DEFAULT_ALIASES, parse_aliases

__all__ = ["Settings", "comma_list"]


def comma_list(text: str) -> list[str]:
    """``text`` split on commas, blanks removed (the list settings and options)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _also(name: str, original: str) -> Any:
    """Read the setting ``name`` also from the original gateway's ``original`` variable."""
    return AliasChoices(name, original)


class Settings(BaseSettings):
    """Gateway and worker configuration."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, populate_by_name=True
    )

    debug: bool = False
    host: str = Field("0.0.0.0", validation_alias=_also("host", "gateway_host"))  # noqa: S104 - `up` binds 127.0.0.1
    port: int = Field(8000, ge=0, le=65535, validation_alias=_also("port", "gateway_port"))
    #: uvicorn's WebSocket implementation (compared in BENCHMARKS.md).
    ws_impl: Literal["fast", "auto", "websockets", "websockets-sansio", "wsproto"] = "fast"
    #: Signs ``magi-gateway admin`` commands; unset, gateways ignore every admin command.
    admin_secret: str | None = None
    #: ``text`` for a terminal, ``json`` for one JSON object per log line (with ids).
    log_format: Literal["text", "json"] = "text"

    redis_host: str = Field("localhost", validation_alias=_also("redis_host", "gateway_redis_host"))
    redis_port: int = Field(6379, ge=1, le=65535, validation_alias=_also("redis_port", "gateway_redis_port"))
    redis_db: int = Field(0, ge=0, validation_alias=_also("redis_db", "gateway_redis_db"))
    redis_password: str | None = Field(
        None, validation_alias=_also("redis_password", "gateway_redis_password")
    )
    redis_url: str | None = None
    #: Prefix of every Redis key, so several deployments can share one server.
    redis_key_prefix: str = "magi"

    fixed_secret: str | None = Field(None, validation_alias=_also("fixed_secret", "gateway_secret"))
    #: JSON object ``{"appid": "secret"}``; when set, only these appids may connect.
    app_secrets: dict[str, str] = Field(default_factory=dict)
    #: Previous minutes whose token is still accepted (the seed scheme accepts 1).
    token_skew_minutes: int = Field(1, ge=0, le=10)
    #: Public keys (PEM or a JWK Set) for RS/PS/ES/EdDSA JWTs; re-read when the file changes.
    jwt_keys_file: str | None = None
    #: When set, a JWT's ``aud`` must name it.
    jwt_audience: str | None = None
    #: When set, a JWT's ``iss`` must equal it.
    jwt_issuer: str | None = None
    #: ``*`` or a comma-separated list of origins, for CORS and the WebSocket Origin check.
    cors_origins: str = Field("*", validation_alias=_also("cors_origins", "gateway_cors_origins"))
    #: ``alias=agent,…``: ids of the original system's clients and the agents that answer
    #: for them, unless an agent is served under that very id (empty: no aliases).
    agent_aliases: str = ",".join(f"{alias}={agent}" for alias, agent in DEFAULT_ALIASES.items())
    #: Proxies whose ``X-Forwarded-For``/``-Proto`` are trusted: comma-separated addresses or
    #: networks (``10.0.0.0/8``), ``*`` for any; empty (the default): none, the peer's own
    #: address is the client's (for the auth-failure throttle, logs). uvicorn's variable name.
    forwarded_allow_ips: str = ""

    judgement_timeout_s: float = Field(60.0, gt=0)
    session_retention_s: int = Field(600, ge=1)
    max_agents_per_request: int = Field(16, ge=1, le=16)
    max_frame_bytes: int = Field(64 * 1024, ge=1024)
    max_input_bytes: int = Field(32 * 1024, ge=1)
    #: Stream chunks kept per session; later chunks are dropped (finals never are).
    max_session_messages: int = Field(10_000, ge=16)
    #: Encoded bytes of one stream message's ``data.thinking``; longer thinking is split.
    max_chunk_bytes: int = Field(64 * 1024, ge=1024)
    #: Encoded bytes of one agent's final; a larger one becomes ``result_code`` 1.
    max_final_bytes: int = Field(256 * 1024, ge=1024)
    #: Client messages per second per connection (average), and the burst allowed.
    max_messages_per_s: float = Field(20.0, gt=0)
    message_burst: int = Field(40, ge=1)
    #: Open connections per appid on one gateway instance.
    max_connections_per_app: int = Field(1000, ge=1)
    #: Running sessions per appid across every instance (over it: ``too_many_sessions``); 0: no limit.
    max_sessions_per_app: int = Field(1000, ge=0)
    #: Sessions an appid may open per second across every instance (over it: ``rate_limited``); 0: no limit.
    max_sessions_per_s_per_app: float = Field(100.0, ge=0)
    #: Connections following one session at once, across every instance (over it, a
    #: ``resume`` is refused with ``too_many_viewers``).
    max_viewers_per_session: int = Field(16, ge=1)
    #: A viewer's registration in Redis lasts this long unless its instance renews it (every
    #: third of it): a dead instance's viewers stop counting and being notified after it.
    viewer_lease_s: float = Field(30.0, ge=0.3)
    #: Open connections (HTTP and WebSocket) per gateway instance; above it a request, or a
    #: WebSocket upgrade, is answered 503 and the connection closed (``/healthz`` exempt).
    max_connections: int = Field(16384, ge=1)
    #: A connection that has not sent complete request headers (for ``/ws``: the upgrade)
    #: this long after it opened, or after its previous request, is closed.
    handshake_timeout_s: float = Field(10.0, gt=0)
    #: Failed authentications per (client address, appid) per minute before that address is
    #: refused for that appid for a while (other appids from it are not).
    max_auth_failures_per_min: int = Field(10, ge=1)
    #: Messages queued for one slow client before it is closed with 1013.
    max_outbound_messages: int = Field(1024, ge=1)
    #: Bytes queued for one slow client before it is closed with 1013 (one larger frame
    #: still fits into an empty buffer); replays wait for room instead.
    max_outbound_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    #: ``/v1`` event streams (SSE) open at once on one gateway instance (over it: 503); each
    #: follows its session on a connection of its own from a pool of this size.
    sse_max_streams: int = Field(1000, ge=1)
    #: An idle event stream gets a ``: keepalive`` comment this often.
    sse_keepalive_s: float = Field(15.0, gt=0)
    #: An event stream whose client has not read for this long is ended (it can resume).
    sse_write_timeout_s: float = Field(30.0, gt=0)
    #: Requests kept per agent stream (approximate trim, a backstop, not a queue policy).
    request_stream_maxlen: int = Field(100_000, ge=100)

    worker_heartbeat_interval_s: float = Field(2.0, gt=0)
    #: A worker not heard from for this long is considered gone.
    worker_ttl_s: float = Field(10.0, gt=0)
    #: How long the gateway reuses an answer to "which of these agents have live workers"
    #: for the next judgement of the same agents (``core.live_agents``; 0: ask every time).
    liveness_cache_s: float = Field(1.0, ge=0)
    worker_concurrency: int = Field(16, ge=1)
    #: A request left unacknowledged this long by a worker that stopped heartbeating it
    #: is taken over by another worker.
    worker_claim_idle_s: float = Field(30.0, gt=0)
    #: Deliveries of one request (first try included) before it fails with result_code 5.
    worker_max_deliveries: int = Field(3, ge=1)

    #: Agents served by backends of the original system, for ``magi-gateway legacy-bridge``
    #: (comma-separated).
    legacy_agents: str = ""
    #: Prepended to the original list names (``queue_agent_judgement``, ``…_stream``,
    #: ``…_final``); empty keeps them exactly as the original backends use them.
    legacy_list_prefix: str = ""
    #: The list end the legacy backends push responses to and pop requests from: ``left``
    #: (``LPUSH``/``BLPOP``, as the original backends) or ``right``. The bridge uses the other.
    legacy_backend_end: Literal["left", "right"] = "left"
    #: Agents served by pub/sub-era backends of the original system, for ``magi-gateway
    #: pubsub-bridge`` (comma-separated).
    pubsub_agents: str = ""
    #: Prepended to the original channel names (``gateway:requests:SID``,
    #: ``gateway:responses:SID``); empty keeps them exactly as the original backends use them.
    pubsub_channel_prefix: str = ""

    redis_backoff_base_s: float = Field(0.05, gt=0)
    redis_backoff_cap_s: float = Field(5.0, gt=0)
    #: Connections one process keeps to Redis; past that, commands wait for a free one.
    redis_max_connections: int = Field(256, ge=4)
    #: How long a command waits for a free pooled connection before failing.
    redis_pool_timeout_s: float = Field(5.0, gt=0)
    #: How long a command waits for Redis's reply before its connection is dropped (0:
    #: as long as Redis takes; a dead server or link is found by TCP keepalive instead).
    redis_socket_timeout_s: float = Field(0.0, ge=0)

    @field_validator("redis_password", "redis_url", "fixed_secret", "admin_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # The original .env template has `REDIS_PASSWORD=` (empty): that means "none".
        return None if value == "" else value

    @field_validator("agent_aliases")
    @classmethod
    def _aliases_parse(cls, value: str) -> str:
        parse_aliases(value)  # raises ValueError, reported with the variable's name
        return value

    @field_validator("jwt_keys_file", "jwt_audience", "jwt_issuer", mode="before")
    @classmethod
    def _empty_jwt_setting_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def redis_dsn(self) -> str:
        """The Redis URL to connect to: ``REDIS_URL`` or one built from the parts."""
        if self.redis_url:
            return self.redis_url
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def cors_origin_list(self) -> list[str]:
        """``CORS_ORIGINS`` split on commas, blanks removed."""
        return comma_list(self.cors_origins)

    @property
    def trusts_proxies(self) -> bool:
        """Whether any proxy's forwarding headers are trusted (``FORWARDED_ALLOW_IPS`` set)."""
        return bool(self.forwarded_allow_ips.strip())

    @property
    def agent_alias_map(self) -> dict[str, str]:
        """``AGENT_ALIASES`` as a mapping, alias to agent."""
        return parse_aliases(self.agent_aliases)

    @property
    def legacy_agent_list(self) -> list[str]:
        """``LEGACY_AGENTS`` split on commas, blanks removed."""
        return comma_list(self.legacy_agents)

    @property
    def pubsub_agent_list(self) -> list[str]:
        """``PUBSUB_AGENTS`` split on commas, blanks removed."""
        return comma_list(self.pubsub_agents)

    @property
    def secrets_configured(self) -> bool:
        """Whether any appid can authenticate at all."""
        return bool(self.fixed_secret or self.app_secrets)
