"""Abuse resistance: rate limits, connection caps, Origin checks, no leaked exception text,
and a property test throwing random frames at a live gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from magi_gateway.settings import Settings

from ._delivery_helpers import DEMO, eventually, spawn_quiet_gateway
from ._support import (
    APPID,
    LEAK_MARKERS,
    SECRET,
    GatewayHandle,
    SessionRecord,
    assert_clean_error,
    assert_well_formed,
    judge,
    judgement_message,
    make_token,
    recv,
    send,
    spawn_gateway,
    spawn_process,
    stop_process,
)

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
PING = '{"type":"ping"}'
PONG = {"type": "pong"}


# -- per-connection rate limit --------------------------------------------------------------------


async def test_rate_limit_answers_rate_limited_and_keeps_the_connection(
    settings: Settings, start_gateway: StartGateway
) -> None:
    limited = settings.model_copy(update={"max_messages_per_s": 5, "message_burst": 5})
    gateway = await start_gateway(limited)
    async with await gateway.connect() as ws, await gateway.connect() as neighbour:
        for _ in range(20):
            await ws.send(PING)
        replies = [await recv(ws) for _ in range(20)]
        pongs = [r for r in replies if r == PONG]
        refused = [r for r in replies if r != PONG]
        for error in refused:
            assert_clean_error(error, "rate_limited")
        assert 5 <= len(pongs) <= 8  # the burst, and what trickled in meanwhile
        assert len(refused) >= 12
        # The limit is per connection: another one of the same appid is served meanwhile.
        await neighbour.send(PING)
        assert await recv(neighbour) == PONG
        # The limited connection stays open and recovers once tokens refill.
        await asyncio.sleep(1.1)
        for _ in range(5):
            await ws.send(PING)
            assert await recv(ws) == PONG


# -- per-appid connection cap ---------------------------------------------------------------------


async def test_connection_cap_per_appid(settings: Settings, start_gateway: StartGateway) -> None:
    capped = settings.model_copy(update={"max_connections_per_app": 2})
    gateway = await start_gateway(capped)
    first = await gateway.connect()
    try:
        async with await gateway.connect() as second:
            async with websockets.connect(gateway.ws_url()) as third:
                error = await recv(third)
                assert_clean_error(error, "too_many_connections")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv(third)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1013
            # Other appids are not affected.
            async with await gateway.connect("other-app") as other:
                await other.send(PING)
                assert await recv(other) == PONG
            await second.send(PING)
            assert await recv(second) == PONG
        # `second` is closed: a place is free again (once the gateway noticed).

        async def admitted() -> websockets.ClientConnection | None:
            ws = await websockets.connect(gateway.ws_url())
            if (await recv(ws))["type"] == "connection_established":
                return ws
            await ws.close()
            return None

        again: websockets.ClientConnection = await eventually(admitted, timeout=5, what="a free place")
        async with again:
            await again.send(PING)
            assert await recv(again) == PONG
    finally:
        await first.close()


# -- Origin -----------------------------------------------------------------------------------------


async def test_origin_list_is_trimmed_and_exact(settings: Settings, start_gateway: StartGateway) -> None:
    # (test_websocket.py covers one allowed and one refused origin.) Here: a list with blanks,
    # look-alike and opaque origins, and a client that sends no Origin header at all.
    listed = settings.model_copy(update={"cors_origins": " http://a.example ,http://b.example:8080, "})
    gateway = await start_gateway(listed)
    for origin in ("http://a.example", "http://b.example:8080"):
        async with websockets.connect(gateway.ws_url(), origin=origin) as ws:  # type: ignore[arg-type]
            assert (await recv(ws))["type"] == "connection_established"
    for origin in (
        "null",
        "http://a.example.evil",
        "http://b.example",
        "https://a.example",
        "http://a.example/",
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(gateway.ws_url(), origin=origin):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403, origin
    async with websockets.connect(gateway.ws_url()) as ws:
        assert "Origin" not in ws.request.headers  # type: ignore[union-attr]
        assert (await recv(ws))["type"] == "connection_established"


async def test_any_origin_is_allowed_by_default(gateway: GatewayHandle) -> None:
    async with websockets.connect(gateway.ws_url(), origin="http://anywhere.example") as ws:  # type: ignore[arg-type]
        assert (await recv(ws))["type"] == "connection_established"


# -- no exception text in error frames ---------------------------------------------------------------

INTERNAL_DETAIL = "password=hunter2 at /srv/magi/internal.py line 7"


async def test_internal_failures_reach_clients_without_exception_text(
    gateway: GatewayHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = gateway.gateway
    assert service is not None

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(INTERNAL_DETAIL)

    def redis_down(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError(f"Error 111 connecting to 10.1.2.3:6379. {INTERNAL_DETAIL}")

    async with await gateway.connect() as ws:
        with monkeypatch.context() as patch:
            patch.setattr(service.store.liveness, "live_agents", crash)
            await send(ws, {"type": "get_agents"})
            error = await recv(ws)
        assert_clean_error(error, "internal_error")
        with monkeypatch.context() as patch:
            # Redis failing inside the store: converted to backend_unavailable at the boundary.
            patch.setattr(service.store.redis, "pipeline", redis_down)
            await send(ws, judgement_message(["melchior"]))
            busy = await recv(ws)
            patch.setattr(service.store.redis, "zrangebyscore", redis_down)
            await send(ws, {"type": "get_agents"})
            busy_agents = await recv(ws)
        for reply in (busy, busy_agents):
            assert_clean_error(reply, "backend_unavailable")
        for reply in (error, busy, busy_agents):
            text = orjson.dumps(reply).decode()
            for leak in ("hunter2", "10.1.2.3", "RuntimeError", "ConnectionError", "Error 111"):
                assert leak not in text, reply
        # Nothing broke: the same connection is served normally again.
        await ws.send(PING)
        assert await recv(ws) == PONG
        record = await judge(ws, ["nobody"])
    assert_well_formed(record, ["nobody"])


# -- property test: random frames at one live connection ----------------------------------------------

MAX_FRAME_BYTES = 1024
TRANSPORT_LIMIT = 4 * MAX_FRAME_BYTES  # uvicorn's ws_max_size in `magi-gateway serve`
DOCUMENTED_ERRORS = {
    "invalid_json",
    "invalid_message",
    "missing_type",
    "unknown_type",
    "missing_field",
    "invalid_field",
    "too_many_agents",
    "frame_too_large",
    "session_not_found",
    "session_completed",
}
TYPES = ["agent_judgement", "cancel", "resume", "ping", "get_agents"]

hex_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
agent_ids = st.lists(
    st.sampled_from(["melchior", "casper", "nobody", "a b", "", "x" * 65, "ok.id-1"]) | st.text(max_size=6),
    max_size=18,
)
near_valid = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | json_values},
    optional={
        "agent_ids": agent_ids | json_values,
        "data": st.fixed_dictionaries({}, optional={"user_input": st.text(max_size=40) | json_values})
        | json_values,
        "request_id": st.text(max_size=140) | json_values,
        "session_id": hex_ids | json_values,
        "last_seq": st.integers(min_value=-3, max_value=2**66) | json_values,
    },
)

valid_messages = st.one_of(
    st.just({"type": "ping"}),
    st.just({"type": "get_agents"}),
    st.fixed_dictionaries(
        {
            "type": st.just("agent_judgement"),
            "agent_ids": st.lists(
                st.sampled_from(["melchior", "casper", "nobody", "ghost-1"]),
                min_size=1,
                max_size=3,
                unique=True,
            ),
            "data": st.fixed_dictionaries({"user_input": st.text(max_size=40)}),
        },
        # Repeated request ids replay their first session.
        optional={"request_id": st.sampled_from(["fuzz-1", "fuzz-2"]) | st.text(min_size=1, max_size=20)},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["resume", "cancel"]), "session_id": hex_ids, "last_seq": st.integers(0, 9)}
    ),
)


@dataclass(frozen=True)
class Frame:
    payload: str | bytes

    @property
    def size(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else len(self.payload.encode())


def as_frames(text: str) -> st.SearchStrategy[Frame]:
    return st.sampled_from([Frame(text), Frame(text.encode())])


frames = st.one_of(
    st.text(max_size=300).map(Frame),
    st.binary(max_size=300).map(Frame),
    json_values.map(json.dumps).flatmap(as_frames),
    near_valid.map(json.dumps).flatmap(as_frames),
    valid_messages.map(json.dumps).flatmap(as_frames),
    st.integers(min_value=MAX_FRAME_BYTES - 40, max_value=TRANSPORT_LIMIT + 2000).map(
        lambda n: Frame('{"type":"ping","pad":"' + "x" * n + '"}')
    ),
)


class LiveConnection:
    """One connection at a time to the fuzzed gateway; a new one only after a documented close."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: SyncConnection | None = None
        self.sessions: set[str] = set()
        self.connections = 0
        self._stack = contextlib.ExitStack()

    def get(self) -> SyncConnection:
        if self.ws is None:
            self.ws = self._stack.enter_context(sync_connect(self.url, open_timeout=10))
            self.connections += 1
            hello = orjson.loads(self.ws.recv(timeout=10))
            assert hello["type"] == "connection_established"
        return self.ws

    def reply(self, ws: SyncConnection) -> dict[str, Any]:
        """The next message that answers a frame (session messages are checked and skipped)."""
        for _ in range(10_000):
            message = orjson.loads(ws.recv(timeout=10))
            assert isinstance(message, dict)
            if "seq" in message and message.get("type") != "agent_judgement_accepted":
                assert message["session_id"] in self.sessions, message
                continue
            return message
        raise AssertionError("no reply")

    def exchange(self, frame: Frame) -> dict[str, Any] | int:
        """Send ``frame``; its reply, or the close code if the gateway closed the connection."""
        ws = self.get()
        try:
            ws.send(frame.payload)
            return self.reply(ws)
        except websockets.ConnectionClosed as closed:
            self.close()
            return closed.rcvd.code if closed.rcvd is not None else -1

    def close(self) -> None:
        self.ws = None
        self._stack.close()


def check_reply(frame: Frame, reply: dict[str, Any], live: LiveConnection) -> None:
    try:
        parsed = orjson.loads(frame.payload)
    except orjson.JSONDecodeError:
        parsed = None
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    if "error" in reply:
        code = reply.get("code")
        assert code in DOCUMENTED_ERRORS, reply
        assert isinstance(reply["error"], str)
        assert reply["error"]
        assert set(reply) <= {"error", "code", "session_id", "request_id"}, reply
        if "request_id" in reply:  # echoed from the message it answers, never made up
            assert isinstance(parsed, dict), reply
            assert reply["request_id"] == parsed.get("request_id"), reply
        if frame.size > MAX_FRAME_BYTES:
            assert code == "frame_too_large", reply
        else:
            assert code != "frame_too_large", reply
        source = frame.payload.decode(errors="replace") if isinstance(frame.payload, bytes) else frame.payload
        for marker in LEAK_MARKERS:  # unless the client itself sent it (an echoed message type)
            assert marker not in reply["error"] or marker in source, reply
        if kind in ("ping", "get_agents") and frame.size <= MAX_FRAME_BYTES:
            raise AssertionError(f"a valid {kind} was refused: {reply}")
        return
    assert frame.size <= MAX_FRAME_BYTES, reply
    if "request_id" in reply:  # echoed from the message it answers, never made up
        assert isinstance(parsed, dict), reply
        assert reply["request_id"] == parsed.get("request_id"), reply
    if {k: v for k, v in reply.items() if k != "request_id"} == PONG:
        assert kind == "ping", reply
    elif reply.get("type") == "agents":
        assert kind == "get_agents", reply
        assert isinstance(reply["agents"], list)
    else:
        assert reply.get("type") == "agent_judgement_accepted", reply
        assert kind == "agent_judgement", reply
        assert reply["seq"] == 1
        live.sessions.add(reply["session_id"])


def wait_for_agents(url: str, agent_ids: list[str], timeout: float = 30) -> None:
    """Block until the gateway lists ``agent_ids`` as served (the worker process is up)."""
    deadline = time.monotonic() + timeout
    with sync_connect(url, open_timeout=10) as ws:
        assert orjson.loads(ws.recv(timeout=10))["type"] == "connection_established"
        while time.monotonic() < deadline:
            ws.send('{"type":"get_agents"}')
            served = {a["agent_id"] for a in orjson.loads(ws.recv(timeout=10))["agents"]}
            if set(agent_ids) <= served:
                return
            time.sleep(0.1)
    raise AssertionError(f"agents {agent_ids} never became live")


def bystander(
    url: str, stop: threading.Event, records: list[SessionRecord], errors: list[BaseException]
) -> None:
    """Another client of the same gateway: demo judgements, one after another, while fuzzing."""
    try:
        with sync_connect(url, open_timeout=10) as ws:
            assert orjson.loads(ws.recv(timeout=10))["type"] == "connection_established"
            for _ in range(30):
                ws.send(orjson.dumps(judgement_message(DEMO, "Shall we have tea?")).decode())
                record = SessionRecord()
                while not record.messages or record.messages[-1]["type"] != "agent_judgement_complete":
                    message = orjson.loads(ws.recv(timeout=20))
                    assert "error" not in message, message
                    record.messages.append(message)
                records.append(record)
                if stop.is_set():
                    return
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_random_frames_are_answered_and_the_gateway_stays_up(redis_url: str, key_prefix: str) -> None:
    env = {
        "REDIS_URL": redis_url,
        "FIXED_SECRET": SECRET,
        "REDIS_KEY_PREFIX": key_prefix,
        "MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
        "MAX_MESSAGES_PER_S": "100000",
        "MESSAGE_BURST": "100000",
    }
    worker = spawn_process(["agent", "demo"], env)
    handle: GatewayHandle | None = None
    try:
        handle = spawn_quiet_gateway(env)
        url = f"ws://127.0.0.1:{handle.port}/ws?appid=fuzz-app&token={make_token('fuzz-app')}"
        other_url = handle.ws_url("bystander-app")
        wait_for_agents(other_url, DEMO)
        live = LiveConnection(url)
        stop = threading.Event()
        records: list[SessionRecord] = []
        errors: list[BaseException] = []
        other = threading.Thread(target=bystander, args=(other_url, stop, records, errors))
        other.start()
        try:

            @hypothesis_settings(
                max_examples=60,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(st.lists(frames, min_size=1, max_size=6))
            def throw(batch: list[Frame]) -> None:
                try:
                    throw_batch(batch)
                except BaseException:
                    live.close()  # a failing example leaves no stale replies to the next one
                    raise

            def throw_batch(batch: list[Frame]) -> None:
                for frame in batch:
                    reply = live.exchange(frame)
                    if isinstance(reply, int):
                        # The only close allowed: the transport's limit on frame size.
                        assert reply == 1009
                        assert frame.size > TRANSPORT_LIMIT, frame.size
                        continue
                    assert frame.size <= TRANSPORT_LIMIT, "an over-limit frame was not refused"
                    check_reply(frame, reply, live)
                # Exactly one reply per frame: the next one answers this ping.
                ws = live.get()
                ws.send(PING)
                assert live.reply(ws) == PONG

            throw()
        finally:
            live.close()
            stop.set()
            other.join(60)
        assert not other.is_alive()
        assert errors == []
        assert records, "the bystander completed no judgement"
        for record in records:
            assert_well_formed(record, DEMO)
            assert record.complete["data"]["verdict"] == "approve"
        assert httpx.get(f"{handle.http}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{handle.http}/readyz", timeout=5).status_code == 200
    finally:
        if handle is not None and handle.process is not None:
            stop_process(handle.process)
        stop_process(worker)


def test_tokens_never_reach_the_access_log(redis_url: str, key_prefix: str) -> None:
    """uvicorn logged ``/ws?appid=…&token=…`` whole (#12 item 13): the token is redacted."""
    env = {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "FIXED_SECRET": SECRET,
        "PYTHONUNBUFFERED": "1",
    }
    handle = spawn_gateway(env, log_level="info")
    assert handle.process is not None
    token = make_token()
    try:

        async def visit() -> None:
            async with websockets.connect(handle.ws_url(token=token)) as ws:
                assert orjson.loads(await ws.recv())["type"] == "connection_established"
            async with httpx.AsyncClient() as http:
                await http.get(f"{handle.http}/healthz?appid={APPID}&token={token}")

        asyncio.run(visit())
    finally:
        handle.process.terminate()
        output = handle.process.communicate(timeout=15)[0].decode()
    assert "/healthz" in output  # the access log is on
    assert "token=[redacted]" in output
    assert token not in output
