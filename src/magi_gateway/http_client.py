"""``MagiHttpClient``: judgements over the ``/v1`` HTTP API, streamed as Server-Sent Events.

::

    async with MagiHttpClient("http://127.0.0.1:8000", appid="demo", secret="…") as client:
        async for message in client.judge("Shall we have tea?", ["melchior", "balthasar", "casper"]):
            print(message)

``judge`` yields the session's messages in order, each once, up to and including
``agent_judgement_complete`` — the frames a WebSocket client gets. When the stream drops
before the end (network, a gateway restarting, a stream dropped for reading too slowly)
the client reconnects with capped exponential backoff and jitter, to the next URL when
several are given, with a fresh token: before the session is known it re-sends the
judgement (same ``request_id``, so it is not started twice), after that it follows the
session from the last seq it yielded (``Last-Event-ID``). Errors the gateway answers are
raised as ``GatewayError`` with its code; only the transient ones are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import httpx
import orjson

from magi_gateway._client_tokens import TokenSource
from magi_gateway.core.errors import AuthenticationFailed, GatewayError, SessionNotFound
from magi_gateway.core.sse import EventReader

__all__ = ["MagiHttpClient", "http_base_url"]

#: Codes of answers worth retrying: the gateway (or its Redis) will be back.
_TRANSIENT = frozenset(
    {"backend_unavailable", "service_restart", "too_many_streams", "too_many_connections", "rate_limited"}
)
_COMPLETE = "agent_judgement_complete"


class _Dropped(Exception):
    """The stream ended before the session's completion."""


class MagiHttpClient:
    """A client of the ``/v1`` API of one or several gateway instances."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        appid: str = "",
        secret: str | None = None,
        token: str | Callable[[], str] | None = None,
        timeout_s: float = 10,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        max_reconnects: int | None = 20,
    ) -> None:
        #: Gateway base URLs (``http://host:port``); reconnects move to the next one.
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one gateway URL is needed")
        self._url_index = 0
        self._tokens = TokenSource(appid, secret, token)
        self.appid = appid
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_reconnects = max_reconnects
        #: How many times a stream was re-established.
        self.reconnects = 0
        # No read timeout: a stream is idle up to a keepalive apart, for as long as it lasts.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, read=None))

    @property
    def url(self) -> str:
        """The gateway base URL in use (or tried next)."""
        return self.urls[self._url_index % len(self.urls)].rstrip("/")

    def _headers(self) -> dict[str, str]:
        token = self._tokens()
        if token.count(".") == 2:
            headers = {"Authorization": f"Bearer {token}"}
            return {**headers, "X-Magi-Appid": self.appid} if self.appid else headers
        return {"X-Magi-Appid": self.appid, "X-Magi-Token": token}

    async def close(self) -> None:
        """Close the client's connections."""
        await self._http.aclose()

    async def __aenter__(self) -> MagiHttpClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def agents(self) -> list[dict[str, Any]]:
        """Agents with live workers (``GET /v1/agents``)."""
        response = await self._http.get(f"{self.url}/v1/agents", headers=self._headers())
        agents: list[dict[str, Any]] = _answer(response)["agents"]
        return agents

    async def cancel(self, session_id: str) -> None:
        """Cancel a session's pending agents (their finals arrive on its stream)."""
        response = await self._http.post(
            f"{self.url}/v1/sessions/{session_id}/cancel", headers=self._headers()
        )
        _answer(response)

    async def judge(
        self, user_input: str, agent_ids: Sequence[str], *, request_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask ``agent_ids`` to judge ``user_input``; yield the session's messages."""
        body = {"agent_ids": list(agent_ids), "data": {"user_input": user_input}}
        body["request_id"] = request_id or uuid.uuid4().hex
        session_id: str | None = None
        last_seq = 0
        failures = 0
        while True:
            headers = {**self._headers(), "Accept": "text/event-stream"}
            if session_id is None:
                request = self._http.build_request(
                    "POST", f"{self.url}/v1/judgements", json=body, headers=headers
                )
            else:
                headers["Last-Event-ID"] = str(last_seq)
                request = self._http.build_request(
                    "GET", f"{self.url}/v1/sessions/{session_id}/events", headers=headers
                )
            try:
                async with contextlib.aclosing(self._stream(request)) as stream:
                    async for message in stream:
                        failures = 0
                        seq = int(message.get("seq", 0))
                        if seq <= last_seq:
                            continue  # a re-sent judgement streams its session from seq 1 again
                        session_id, last_seq = str(message["session_id"]), seq
                        yield message
                        if message.get("type") == _COMPLETE:
                            return
                raise _Dropped
            except (_Dropped, httpx.TransportError) as exc:
                failures += 1
                await self._reconnect_after(failures, exc)
            except GatewayError as exc:
                if exc.code not in _TRANSIENT:
                    raise
                failures += 1
                await self._reconnect_after(failures, exc)

    async def _stream(self, request: httpx.Request) -> AsyncGenerator[dict[str, Any], None]:
        response = await self._http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                _answer(response)
            reader = EventReader()
            async for line in response.aiter_lines():
                event = reader.feed(line)
                if event is None:
                    continue
                message = orjson.loads(event.data)
                if event.event == "error":
                    raise _error(message)
                yield message
        finally:
            await response.aclose()

    async def _reconnect_after(self, failures: int, exc: Exception) -> None:
        if self.max_reconnects is not None and failures > self.max_reconnects:
            raise GatewayError("Gateway unreachable", code="connection_lost") from exc
        self.reconnects += 1
        self._url_index += 1
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2**failures)
        await asyncio.sleep(random.uniform(delay / 2, delay))


def _error(answer: dict[str, Any]) -> GatewayError:
    code = str(answer.get("code", "internal_error"))
    text = str(answer.get("error", "Gateway error"))
    kind = {"auth_failed": AuthenticationFailed, "session_not_found": SessionNotFound}.get(code, GatewayError)
    return kind(text, code=code, session_id=answer.get("session_id"))


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON of a successful answer; an error answer raised as ``GatewayError``."""
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        raise GatewayError(f"Unexpected answer ({response.status_code})", code="internal_error") from None
    if response.status_code >= 400:
        raise _error(body)
    return body


def http_base_url(url: str) -> str:
    """The HTTP API's base for a gateway URL (``ws://h:p/ws`` → ``http://h:p``)."""
    scheme, sep, rest = url.partition("://")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    host = rest.split("/", 1)[0]
    return f"{scheme}{sep}{host}" if sep else url.rstrip("/")
