"""The limit baseline's own key names and Redis address (it may not use the product's keys
module), apart from its gateway so that the harness can read them without picows, which
only the ``bench`` and ``test`` extras install."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["frames_channel", "ready_key", "redis_address", "requests_key"]


def _key(prefix: str, *parts: bytes) -> bytes:
    return b":".join((prefix.encode(), b"limit", *parts))


def requests_key(prefix: str) -> bytes:
    """The list the gateways push session ids on and the workers pop them from."""
    return _key(prefix, b"requests")


def frames_channel(prefix: str, gateway_id: bytes) -> bytes:
    """The channel the worker publishes a gateway's frames on."""
    return _key(prefix, b"frames", gateway_id)


def ready_key(prefix: str, name: str) -> bytes:
    """The key a baseline worker sets once it is connected."""
    return _key(prefix, b"ready", name.encode())


def redis_address(url: str) -> tuple[str, int]:
    """Host and port of a ``redis://host:port`` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379
