"""``MagiClient``: an async Python client that survives drops.

::

    async with MagiClient("ws://127.0.0.1:8000/ws", appid="demo", secret="…") as client:
        async for message in client.judge("Shall we have tea?", ["melchior", "balthasar", "casper"]):
            print(message)

``judge`` yields the session's messages in order, each exactly once, up to and
including ``agent_judgement_complete``. Instead of ``secret`` a client may give ``token``:
a JWT, or a callable returning one (a *token factory*); with a factory the client
sends ``refresh`` with a new token before the current one expires, and gets a fresh
one on every reconnect. When the connection drops (network, gateway
restart, 1013 for a slow reader) the client reconnects with capped exponential
backoff and jitter, with a fresh token, re-sends judgements not yet accepted (same
``request_id``, so the gateway does not start them twice) and resumes every open
session from the last seq it delivered. Authentication failures are not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets

from magi_gateway._client_tokens import TokenSource, refresh_delay
from magi_gateway._tasks import cancel_and_wait
from magi_gateway.core.errors import CLOSE_AUTH_FAILED, AuthenticationFailed, GatewayError, SessionNotFound

__all__ = ["ConnectionLost", "MagiClient"]

logger = logging.getLogger(__name__)

#: Messages buffered per session before the reader waits for the consumer (policy: block;
#: a reader that stops reading lets the gateway close it with 1013, then it resumes).
_QUEUE_SIZE = 1024
#: Error code meaning "retry later": the gateway could not reach Redis.
_RETRYABLE = "backend_unavailable"
_JUDGE_ATTEMPTS = 10


class ConnectionLost(GatewayError):
    """The connection dropped while waiting for a reply that cannot be replayed."""

    code = "connection_lost"


#: The message a reply without request_id answers (errors: whichever is oldest).
_ASKED_BY = {"pong": "ping", "agents": "get_agents", "agent_judgement_accepted": "agent_judgement"}


class _Session:
    __slots__ = ("last_seq", "queue")

    def __init__(self) -> None:
        self.last_seq = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue(_QUEUE_SIZE)


class _Waiter:
    """A request waiting for its one reply (judgements: the accepted message).

    Replies are matched by the ``request_id`` the gateway echoes; a gateway that does
    not echo it answers the oldest waiter expecting that kind of reply.
    """

    __slots__ = ("future", "message", "replayable", "request_id")

    def __init__(self, message: dict[str, Any], request_id: str, *, replayable: bool) -> None:
        self.message = message
        self.request_id = request_id
        #: Re-sent after a reconnect (judgements, idempotent by request_id); others fail.
        self.replayable = replayable
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()


class MagiClient:
    """A reconnecting connection to a gateway, shared by concurrent judgements."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        appid: str = "",
        secret: str | None = None,
        token: str | Callable[[], str] | None = None,
        open_timeout_s: float = 10,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        max_reconnects: int | None = None,
    ) -> None:
        #: Gateway URLs; reconnects move to the next one (several instances behind no balancer).
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one gateway URL is needed")
        self._url_index = 0
        self._tokens = TokenSource(appid, secret, token)
        #: The appid sent in the URL; empty with a JWT means "the token's sub".
        self.appid = appid
        self.secret = secret
        self._token_expired = False  # the gateway said so before closing 4001
        self._refresher: asyncio.Task[None] | None = None
        self.open_timeout_s = open_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_reconnects = max_reconnects
        self.connection_id: str | None = None
        #: How many times the connection was re-established.
        self.reconnects = 0
        self._ws: websockets.ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._failure: GatewayError | None = None
        self._sessions: dict[str, _Session] = {}
        self._waiters: deque[_Waiter] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Sessions this client cancelled: errors about them answer no request.
        self._cancelled: set[str] = set()
        #: Operators' broadcast messages, newest last (bounded: the oldest are dropped).
        self.broadcasts: deque[str] = deque(maxlen=100)

    def token(self) -> str:
        """A token to connect with: the factory's, the JWT given, or the seed token of this minute."""
        return self._tokens()

    # -- connection ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The gateway URL in use (or tried next)."""
        return self.urls[self._url_index % len(self.urls)]

    async def connect(self) -> None:
        """Connect (raising on failure), then keep the connection up in the background."""
        await self._open()
        self._runner = asyncio.create_task(self._run(), name="magi-client")

    async def _open(self) -> None:
        token = self.token()
        query = urlencode({"appid": self.appid, "token": token} if self.appid else {"token": token})
        url = self.urls[self._url_index % len(self.urls)]
        ws = await websockets.connect(f"{url}?{query}", open_timeout=self.open_timeout_s, max_size=None)
        try:
            hello = orjson.loads(await ws.recv())
        except websockets.ConnectionClosed as exc:
            raise ConnectionLost("closed during handshake") from exc
        if hello.get("type") != "connection_established":
            await ws.close()
            if hello.get("code") in ("auth_failed", "auth_throttled"):
                raise AuthenticationFailed(hello.get("error", "Authentication failed"), code=hello["code"])
            raise GatewayError(hello.get("error", "connection refused"), code=hello.get("code"))
        self._ws = ws
        self.connection_id = hello["connection_id"]
        self._token_expired = False
        if (expires_at := self._tokens.refresh_due(token)) is not None:
            if self._refresher is not None:
                self._refresher.cancel()
            self._refresher = self._spawn(self._refresh_before(expires_at))
        # Re-send what the gateway may not have seen, then resume every open session.
        for waiter in self._waiters:
            await ws.send(orjson.dumps(waiter.message).decode())
        for session_id, session in self._sessions.items():
            resume = {"type": "resume", "session_id": session_id, "last_seq": session.last_seq}
            await ws.send(orjson.dumps(resume).decode())
        self._connected.set()

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            assert self._ws is not None
            try:
                async for raw in self._ws:
                    await self._dispatch(orjson.loads(raw))
                    failures = 0
                close_code = self._ws.close_code
            except websockets.ConnectionClosed as exc:
                close_code = exc.rcvd.code if exc.rcvd else None
            self._connected.clear()
            if self._closing:
                return
            if close_code == CLOSE_AUTH_FAILED and not (self._token_expired and self._tokens.refreshes):
                self._fail(AuthenticationFailed("Authentication failed"))
                return
            self._fail_replies()
            while not self._closing:
                failures += 1
                if self.max_reconnects is not None and failures > self.max_reconnects:
                    self._fail(ConnectionLost("gave up reconnecting"))
                    return
                # Equal jitter (never less than half the step), unlike the servers' full
                # jitter: a client must not come back at once to a gateway that just dropped it.
                delay = min(self.backoff_cap_s, self.backoff_base_s * 2**failures)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                self._url_index += 1
                try:
                    await self._open()
                    self.reconnects += 1
                    break
                except AuthenticationFailed as exc:
                    self._fail(exc)
                    return
                except (OSError, GatewayError, websockets.WebSocketException) as exc:
                    logger.info("reconnect failed (%s); retrying", exc)

    def _fail(self, exc: GatewayError) -> None:
        """End everything waiting: the connection is not coming back."""
        self._failure = exc
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        for session in self._sessions.values():
            # A full queue's consumer finds the failure once it has drained it (see judge).
            with contextlib.suppress(asyncio.QueueFull):
                session.queue.put_nowait(exc)

    def _fail_replies(self) -> None:
        """Replies to ping/get_agents cannot be replayed: fail those waiters."""
        kept: deque[_Waiter] = deque()
        for waiter in self._waiters:
            if not waiter.replayable and not waiter.future.done():
                waiter.future.set_exception(ConnectionLost("connection lost before the reply"))
            elif waiter.replayable:
                kept.append(waiter)
        self._waiters = kept

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        await cancel_and_wait([*self._tasks, *([self._runner] if self._runner is not None else [])])

    async def __aenter__(self) -> MagiClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- messages --------------------------------------------------------------------

    async def _refresh_before(self, expires_at: float) -> None:
        """Send ``refresh`` with a token from the factory before each exp."""
        while True:
            await asyncio.sleep(refresh_delay(expires_at, time.time()))
            try:
                reply = await self._request({"type": "refresh", "token": self.token()})
            except Exception as exc:  # the gateway closes at exp; a reconnect gets a new token
                logger.warning("token refresh failed: %s", exc)
                return
            expires_at = float(reply["expires_at"])

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") == "broadcast":
            self.broadcasts.append(str(message.get("message", "")))
            return  # not a reply to anything
        if message.get("code") == "token_expired":
            self._token_expired = True  # the close (4001) follows
            return
        session_id = message.get("session_id")
        request_id = message.get("request_id")
        if request_id is not None and "seq" not in message:
            # pong, agents, or an error about one of our messages: that message's reply.
            waiter = self._take_waiter(lambda w: w.request_id == request_id)
            if waiter is not None:
                waiter.future.set_result(message)
                return
        if message.get("type") == "agent_judgement_accepted":
            waiter = self._take_waiter(lambda w: w.request_id == request_id)
            if waiter is not None:
                self._sessions.setdefault(session_id, _Session())  # type: ignore[arg-type]
                waiter.future.set_result(message)
        if session_id in self._sessions:
            session = self._sessions[session_id]
            seq = message.get("seq")
            if seq is None and message.get("code") == _RETRYABLE:
                self._spawn_resume(session_id)  # the gateway could not reach Redis: try again
            elif seq is None:  # an error about the session (e.g. session_not_found on resume)
                await session.queue.put(message)
            elif seq > session.last_seq:  # older ones are replays we already delivered
                session.last_seq = seq
                await session.queue.put(message)
            return
        # A gateway that echoes no request_id: the oldest waiter for this kind of reply.
        # An error naming a session we do not follow is such a reply too.
        if session_id in self._cancelled:
            return  # the reply to a cancel (session_completed / session_not_found)
        if session_id is None or "error" in message:
            asked = _ASKED_BY.get(str(message.get("type")))
            waiter = self._take_waiter(lambda w: asked is None or w.message["type"] == asked)
            if waiter is not None:
                waiter.future.set_result(message)

    def _take_waiter(self, matches: Callable[[_Waiter], bool]) -> _Waiter | None:
        """Remove and return the oldest pending waiter that ``matches``."""
        for waiter in self._waiters:
            if not waiter.future.done() and matches(waiter):
                self._waiters.remove(waiter)
                return waiter
        return None

    def _spawn_resume(self, session_id: str) -> None:
        self._spawn(self._resume_later(session_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resume_later(self, session_id: str) -> None:
        await asyncio.sleep(random.uniform(self.backoff_base_s, self.backoff_cap_s))
        session = self._sessions.get(session_id)
        if session is not None and self._connected.is_set() and self._ws is not None:
            resume = {"type": "resume", "session_id": session_id, "last_seq": session.last_seq}
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(orjson.dumps(resume).decode())

    async def _request(self, message: dict[str, Any], *, replayable: bool = False) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        request_id: str = message.setdefault("request_id", uuid.uuid4().hex)
        waiter = _Waiter(message, request_id, replayable=replayable)
        self._waiters.append(waiter)
        if self._connected.is_set() and self._ws is not None:
            # If the send fails, the waiter is re-sent on reconnect or failed by _fail_replies.
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(orjson.dumps(message).decode())
        reply = await waiter.future
        if "error" in reply:
            raise GatewayError(reply["error"], code=reply.get("code"))
        return reply

    async def ping(self) -> None:
        """Round trip to the gateway."""
        await self._request({"type": "ping"})

    async def agents(self) -> list[dict[str, Any]]:
        """Agents that have live workers."""
        reply = await self._request({"type": "get_agents"})
        agents: list[dict[str, Any]] = reply["agents"]
        return agents

    async def cancel(self, session_id: str) -> None:
        """Ask the gateway to cancel a session (its finals arrive on the session)."""
        if self._ws is not None:
            self._cancelled.add(session_id)
            await self._ws.send(orjson.dumps({"type": "cancel", "session_id": session_id}).decode())

    async def judge(
        self, user_input: str, agent_ids: Sequence[str], *, request_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask ``agent_ids`` to judge ``user_input``; yield the session's messages."""
        request_id = request_id or uuid.uuid4().hex
        message = {
            "type": "agent_judgement",
            "agent_ids": list(agent_ids),
            "data": {"user_input": user_input},
            "request_id": request_id,
        }
        for attempt in range(_JUDGE_ATTEMPTS):
            try:
                accepted = await self._request(message, replayable=True)
                break
            except GatewayError as exc:
                # Redis unreachable behind the gateway: the same request_id is safe to retry.
                if exc.code != _RETRYABLE or attempt == _JUDGE_ATTEMPTS - 1:
                    raise
                delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt + 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
        session_id = accepted["session_id"]
        session = self._sessions[session_id]
        try:
            while True:
                if session.queue.empty() and self._failure is not None:
                    raise self._failure
                item = await session.queue.get()
                if isinstance(item, GatewayError):
                    raise item
                if "error" in item:
                    raise SessionNotFound(item["error"], code=item.get("code"), session_id=session_id)
                yield item
                if item.get("type") == "agent_judgement_complete":
                    return
        finally:
            self._sessions.pop(session_id, None)
