"""Plain-text HTTP answers written straight to a transport, before any ASGI app runs:
the edge's refusals (431, 503, in ``http_protocol``) and the fast driver's refused
upgrades (400, 403, 404, in ``ws_protocol``). One format for both, with uvicorn's
default headers (``server``, ``date``) like every other answer of the server.
"""

from __future__ import annotations

import http
from collections.abc import Iterable

__all__ = ["plain_response"]


def plain_response(status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """An HTTP/1.1 ``status`` response with ``message`` as its body, closing the connection."""
    body = message.encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    head.extend(name + b": " + value + b"\r\n" for name, value in headers)
    head.append(b"content-type: text/plain; charset=utf-8\r\n")
    head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body
