"""The ``redis+cluster://`` and ``redis+sentinel://`` URL forms of ``REDIS_URL`` (parsing only).

See ``redis.client`` for what they mean. Messages never quote a URL, which may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

__all__ = [
    "CLUSTER_SCHEMES",
    "SENTINEL_SCHEMES",
    "ClusterURL",
    "SentinelURL",
    "parse_cluster_url",
    "parse_sentinel_url",
]

# -- Cluster ---------------------------------------------------------------------------------

#: URL schemes of a Redis Cluster (``rediss+``: TLS).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class ClusterURL:
    """The parts of a ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_cluster_url(url: str) -> ClusterURL | None:
    """The seed nodes of a cluster URL, None for other schemes; ``ValueError`` when malformed."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    netloc = rest.partition("?")[0].partition("/")[0]
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    nodes = []
    for text in hosts.split(","):
        host, port = _address(text, None)
        if port is None:
            raise ValueError(f"cluster node {text!r} is not HOST:PORT")
        nodes.append((host, port))
    return ClusterURL(
        nodes=tuple(nodes),
        username=unquote(user) if at and user else None,
        password=unquote(password) if at and colon else None,
        ssl=scheme.lower() == "rediss+cluster",
    )


# -- Sentinel --------------------------------------------------------------------------------

#: URL schemes of a Sentinel-managed master (``rediss+``: TLS everywhere).
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("max_connections", "sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    max_connections: int | None = None


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The parts of a Sentinel URL, None for other schemes; ``ValueError`` when malformed.

    Messages never quote the URL, which may hold a password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    names = [unquote(part) for part in path.removesuffix("/").split("/")] if path else []
    if not names or not names[0] or len(names) > 2:
        raise ValueError("a sentinel REDIS_URL ends in /SERVICE or /SERVICE/DB")
    if len(names) == 2 and not names[1].isdigit():
        raise ValueError("the DB of a sentinel REDIS_URL is a number")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_SENTINEL_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown sentinel REDIS_URL option {unknown[0]!r}; known: {', '.join(_SENTINEL_OPTIONS)}"
        )
    max_connections = options.get("max_connections")
    if max_connections is not None and not (max_connections.isdigit() and int(max_connections) > 0):
        raise ValueError("max_connections in a sentinel REDIS_URL is a positive number")
    return SentinelURL(
        sentinels=tuple(_sentinel_address(host) for host in hosts.split(",")),
        service_name=names[0],
        db=int(names[1]) if len(names) == 2 else 0,
        username=unquote(user) if at and user else None,
        password=unquote(password) if at and colon else None,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=scheme.lower() == "rediss+sentinel",
        max_connections=int(max_connections) if max_connections else None,
    )


def _sentinel_address(text: str) -> tuple[str, int]:
    host, port = _address(text, _SENTINEL_PORT)
    assert port is not None
    return host, port


def _address(text: str, default_port: int | None) -> tuple[str, int | None]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]``."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"address {text!r} is not [IPV6]:PORT")
        port = port[1:]
    else:
        host, _, port = text.partition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"address {text!r} is not HOST[:PORT]")
    return host, int(port) if port else default_port
