"""The WebSocket protocol and HTTP endpoints, against real uvicorn, real Redis, real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from magi_gateway.agents import demo_agents
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import (
    APPID,
    GatewayHandle,
    assert_clean_error,
    assert_well_formed,
    collect_sessions,
    judge,
    judgement_message,
    recv,
    send,
)

DEMO = ["melchior", "balthasar", "casper"]
WEAPON = "Should we deploy the untested weapon?"

StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]
StartWorker = Callable[..., Awaitable[Worker]]


async def assert_pong(ws: websockets.ClientConnection) -> None:
    """The connection is still open and serving: a ping gets exactly the pong frame."""
    await ws.send('{"type":"ping"}')
    raw = await recv_raw(ws)
    assert raw == '{"type":"pong"}'


async def recv_raw(ws: websockets.ClientConnection, timeout: float = 10) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


# -- connection and simple requests ---------------------------------------------------------


async def test_connection_established_is_first_frame(gateway: GatewayHandle) -> None:
    async with websockets.connect(gateway.ws_url()) as ws:
        hello = orjson.loads(await recv_raw(ws))
    assert hello["type"] == "connection_established"
    assert isinstance(hello["connection_id"], str)
    assert hello["connection_id"]


async def test_connection_ids_differ(gateway: GatewayHandle) -> None:
    async with websockets.connect(gateway.ws_url()) as a, websockets.connect(gateway.ws_url()) as b:
        first = orjson.loads(await recv_raw(a))
        second = orjson.loads(await recv_raw(b))
    assert first["connection_id"] != second["connection_id"]


async def test_ping_gets_exact_pong(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        await ws.send(orjson.dumps({"type": "ping"}).decode())
        assert await recv_raw(ws) == '{"type":"pong"}'


async def test_get_agents_empty_without_workers(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        await send(ws, {"type": "get_agents"})
        assert await recv(ws) == {"type": "agents", "agents": []}


async def test_get_agents_lists_live_agents_with_worker_counts(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    await start_worker([demo_agents(delay_s=0.01)[0]])  # a second worker for melchior only
    async with await gateway.connect() as ws:
        await send(ws, {"type": "get_agents"})
        reply = await recv(ws)
    assert reply["type"] == "agents"
    workers = {a["agent_id"]: a["workers"] for a in reply["agents"]}
    assert workers == {"melchior": 2, "balthasar": 1, "casper": 1}


async def test_get_agents_forgets_a_stopped_worker(
    gateway: GatewayHandle, start_worker: StartWorker, settings: Settings, redis_client: Redis
) -> None:
    worker = await start_worker(demo_agents(delay_s=0.01))
    store = Store(redis_client, Keys(settings.redis_key_prefix))
    assert await store.liveness.live_agents()
    worker.stop()
    for _ in range(200):  # stop() retires the worker once its read loop notices
        if not await store.liveness.live_agents():
            break
        await asyncio.sleep(0.05)
    async with await gateway.connect() as ws:
        await send(ws, {"type": "get_agents"})
        assert (await recv(ws))["agents"] == []


# -- judgements ---------------------------------------------------------------------------


async def test_three_agent_judgement_with_demo_agents(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with await gateway.connect() as ws:
        record = await judge(ws, DEMO, WEAPON)
    assert_well_formed(record, DEMO)
    accepted = record.messages[0]
    assert accepted["agent_ids"] == DEMO
    for agent_id in DEMO:
        positions = [i for i, m in enumerate(record.messages) if m.get("agent_id") == agent_id]
        kinds = [record.messages[i]["type"] for i in positions]
        assert kinds[-1] == "agent_judgement_final"
        assert kinds[:-1], f"{agent_id} streamed nothing"
        assert set(kinds[:-1]) == {"agent_judgement_stream"}
        for i in positions[:-1]:
            assert isinstance(record.messages[i]["data"]["thinking"], str)
    finals = record.finals
    for agent_id in DEMO:
        assert finals[agent_id]["result_code"] == 0
        assert isinstance(finals[agent_id]["data"]["judgement"], str)
        assert finals[agent_id]["data"]["judgement"]
    decisions = {a: finals[a]["data"]["decision"] for a in DEMO}
    assert decisions == {"melchior": "reject", "balthasar": "reject", "casper": "approve"}
    complete = record.complete["data"]
    assert complete["verdict"] == "reject"
    assert list(complete["results"]) == DEMO
    assert complete["results"] == {
        "melchior": {"result_code": 0, "decision": "reject"},
        "balthasar": {"result_code": 0, "decision": "reject"},
        "casper": {"result_code": 0, "decision": "approve"},
    }


async def test_demo_agents_approve_tea(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with await gateway.connect() as ws:
        record = await judge(ws, DEMO, "Shall we have tea?")
    assert_well_formed(record, DEMO)
    assert record.complete["data"]["verdict"] == "approve"


async def test_request_id_is_echoed_in_accepted(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with await gateway.connect() as ws:
        record = await judge(ws, ["casper"], request_id="client-key-1")
    assert_well_formed(record, ["casper"])
    accepted = record.messages[0]
    assert accepted["request_id"] == "client-key-1"
    assert accepted["agent_ids"] == ["casper"]
    assert accepted["seq"] == 1


async def test_repeated_request_id_replays_the_same_session(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        original = await judge(ws, ["nobody"], request_id="retry-me")
    async with await gateway.connect() as ws:
        retried = await judge(ws, ["nobody"], request_id="retry-me")
        await assert_pong(ws)  # the replay is complete and nothing follows it
    assert retried.messages == original.messages
    # Another appid's identical request_id is a different request.
    async with await gateway.connect("other-app") as ws:
        other = await judge(ws, ["nobody"], request_id="retry-me")
    assert other.messages[0]["session_id"] != original.messages[0]["session_id"]


async def test_colons_in_appid_and_request_id_do_not_make_requests_collide(gateway: GatewayHandle) -> None:
    """``appA`` + ``x:r9`` and ``appA:x`` + ``r9`` are two requests (issue: idempotency keys collided)."""
    async with await gateway.connect("appA") as ws:
        first = await judge(ws, ["nobody"], request_id="x:r9")
    async with await gateway.connect("appA:x") as ws:
        second = await judge(ws, ["nobody"], request_id="r9")
    assert second.messages[0]["session_id"] != first.messages[0]["session_id"]
    assert second.messages[0]["request_id"] == "r9"
    # The first tenant's retry is still its own request: the same session, not a new start.
    async with await gateway.connect("appA") as ws:
        retried = await judge(ws, ["nobody"], request_id="x:r9")
    assert retried.messages == first.messages


async def test_concurrent_duplicate_request_id_gets_the_same_session(gateway: GatewayHandle) -> None:
    async def replies(ws: websockets.ClientConnection) -> list[dict[str, Any]]:
        """Messages until the session completes, an error, or a quiet second."""
        got: list[dict[str, Any]] = []
        try:
            while not got or ("error" not in got[-1] and got[-1]["type"] != "agent_judgement_complete"):
                got.append(await recv(ws, timeout=1))
        except TimeoutError:
            pass
        return got

    for i in range(3):
        async with await gateway.connect() as first, await gateway.connect() as second:
            message = judgement_message(["nobody"], request_id=f"dup-{i}")
            await asyncio.gather(send(first, message), send(second, message))
            a, b = await asyncio.gather(replies(first), replies(second))
        assert [m for m in a + b if "error" in m] == []
        assert len({m["session_id"] for m in a + b}) == 1  # one session for both requests
        assert any(r and r[-1]["type"] == "agent_judgement_complete" for r in (a, b))


async def test_unknown_agent_gets_code_3_without_waiting_for_the_timeout(
    settings: Settings, start_gateway: StartGateway
) -> None:
    # The judgement timeout is far longer than the read timeout below: the final must
    # come from the "no live worker" check, not from the deadline.
    gateway = await start_gateway(settings.model_copy(update={"judgement_timeout_s": 600}))
    async with await gateway.connect() as ws:
        record = await judge(ws, ["nobody"], timeout=20)
    assert_well_formed(record, ["nobody"])
    assert [m["type"] for m in record.messages] == [
        "agent_judgement_accepted",
        "agent_judgement_final",
        "agent_judgement_complete",
    ]
    final = record.finals["nobody"]
    assert final["result_code"] == 3
    assert isinstance(final["data"]["error"], str)
    assert final["data"]["error"]
    assert record.complete["data"] == {"verdict": "abstain", "results": {"nobody": {"result_code": 3}}}


async def test_known_and_unknown_agents_mixed(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    agents = ["melchior", "ghost", "casper"]
    async with await gateway.connect() as ws:
        record = await judge(ws, agents, "Shall we have tea?")
    assert_well_formed(record, agents)
    finals = record.finals
    assert finals["ghost"]["result_code"] == 3
    assert finals["ghost"]["data"]["error"]
    assert finals["melchior"]["result_code"] == 0
    assert finals["casper"]["result_code"] == 0
    assert all(m["agent_id"] != "ghost" for m in record.of_type("agent_judgement_stream"))
    results = record.complete["data"]["results"]
    assert list(results) == agents
    assert results["ghost"] == {"result_code": 3}
    assert record.complete["data"]["verdict"] == "approve"


async def test_two_concurrent_judgements_on_one_connection(
    gateway: GatewayHandle, start_worker: StartWorker
) -> None:
    await start_worker(demo_agents(delay_s=0.01))
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(DEMO, WEAPON))
        await send(ws, judgement_message(["casper", "balthasar"], "Shall we have tea?"))
        records = await collect_sessions(ws, 2)
    assert len(records) == 2
    by_agents = {tuple(r.messages[0]["agent_ids"]): r for r in records.values()}
    weapon = by_agents[tuple(DEMO)]
    tea = by_agents[("casper", "balthasar")]
    assert_well_formed(weapon, DEMO)
    assert_well_formed(tea, ["casper", "balthasar"])
    assert weapon.complete["data"]["verdict"] == "reject"
    assert tea.complete["data"]["verdict"] == "approve"
    assert list(tea.complete["data"]["results"]) == ["casper", "balthasar"]


# -- errors: reply, keep the connection open ---------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param("this is {not json", "invalid_json", id="invalid-json"),
        pytest.param('{"agent_ids": ["melchior"]}', "missing_type", id="missing-type"),
        pytest.param('{"type": "dance"}', "unknown_type", id="unknown-type"),
        pytest.param(
            '{"type": "agent_judgement", "data": {"user_input": "x"}}',
            "missing_field",
            id="missing-agent-ids",
        ),
        pytest.param(
            orjson.dumps(judgement_message([f"agent{i}" for i in range(17)])).decode(),
            "too_many_agents",
            id="17-agents",
        ),
    ],
)
async def test_bad_frame_gets_error_and_connection_stays_open(
    gateway: GatewayHandle, frame: str, code: str
) -> None:
    async with await gateway.connect() as ws:
        await ws.send(frame)
        error = await recv(ws)
        assert_clean_error(error, code)
        await assert_pong(ws)
        # ...and can still do real work.
        await send(ws, {"type": "get_agents"})
        assert (await recv(ws))["type"] == "agents"


async def test_sixteen_agents_are_allowed(gateway: GatewayHandle) -> None:
    agents = [f"agent{i}" for i in range(16)]
    async with await gateway.connect() as ws:
        record = await judge(ws, agents)
    assert_well_formed(record, agents)
    assert {f["result_code"] for f in record.finals.values()} == {3}


async def test_every_error_in_a_row_on_one_connection(gateway: GatewayHandle) -> None:
    frames = [
        ("]]", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('{"type": null}', "missing_type"),
        ('{"type": "' + "x" * 500 + '"}', "unknown_type"),
        ('{"type": 7}', "unknown_type"),
        ('{"type": "agent_judgement", "agent_ids": ["a"]}', "missing_field"),
        ('{"type": "agent_judgement", "agent_ids": [], "data": {"user_input": "x"}}', "invalid_field"),
        ('{"type": "agent_judgement", "agent_ids": ["a b"], "data": {"user_input": "x"}}', "invalid_field"),
        ('{"type": "agent_judgement", "agent_ids": ["a"], "data": {"user_input": 5}}', "invalid_field"),
        ('{"type": "resume", "session_id": "../../etc", "last_seq": 0}', "invalid_field"),
        ('{"type": "resume", "session_id": "' + "a" * 32 + '"}', "missing_field"),
    ]
    async with await gateway.connect() as ws:
        for frame, code in frames:
            await ws.send(frame)
            error = await recv(ws)
            assert_clean_error(error, code)
            await assert_pong(ws)


async def test_oversized_frame_gets_frame_too_large(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings.model_copy(update={"max_frame_bytes": 2048}))
    async with await gateway.connect() as ws:
        await send(ws, judgement_message(["casper"], "x" * 3000))
        assert_clean_error(await recv(ws), "frame_too_large")
        await assert_pong(ws)
        # A frame just under the limit is still served.
        record = await judge(ws, ["nobody"], "y" * 1800)
    assert_well_formed(record, ["nobody"])


async def test_binary_frame_with_valid_json_is_accepted(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        await ws.send(b'{"type":"ping"}')
        assert await recv_raw(ws) == '{"type":"pong"}'
        await ws.send(orjson.dumps(judgement_message(["nobody"])))
        accepted = await recv(ws)
    assert accepted["type"] == "agent_judgement_accepted"


async def test_resume_of_unknown_session(gateway: GatewayHandle) -> None:
    session_id = "0123456789abcdef" * 2
    async with await gateway.connect() as ws:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 0})
        error = await recv(ws)
        assert_clean_error(error, "session_not_found")
        assert error["session_id"] == session_id
        await assert_pong(ws)


async def test_resume_of_another_apps_session_is_not_found(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        record = await judge(ws, ["nobody"])
    session_id = record.messages[0]["session_id"]
    async with await gateway.connect("other-app") as other:
        await send(other, {"type": "resume", "session_id": session_id, "last_seq": 0})
        error = await recv(other)
    assert_clean_error(error, "session_not_found")
    assert error["session_id"] == session_id


async def test_resume_of_a_finished_session_replays_after_last_seq(gateway: GatewayHandle) -> None:
    async with await gateway.connect() as ws:
        record = await judge(ws, ["nobody", "ghost"])
    session_id = record.messages[0]["session_id"]
    async with await gateway.connect() as ws:
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 2})
        replay = [await recv(ws) for _ in range(len(record.messages) - 2)]
        await assert_pong(ws)  # nothing more was sent before the pong
    assert replay == record.messages[2:]


# -- HTTP ---------------------------------------------------------------------------------


async def test_healthz_readyz_metrics_console(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        async with await gateway.connect():
            metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "magi_connections" in metrics.text
        console = await http.get("/")
        assert console.status_code == 200
        assert console.headers["content-type"].startswith("text/html")
        assert "<html" in console.text.lower()


async def test_debug_token_route_issues_a_working_token(gateway: GatewayHandle) -> None:
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        reply = await http.post("/v1/token", json={"appid": "console-app"})
        bad = await http.post("/v1/token", content=b"not json")
    assert reply.status_code == 200
    body = reply.json()
    assert body["appid"] == "console-app"
    assert len(body["token"]) == 10
    assert bad.status_code == 400
    url = f"ws://127.0.0.1:{gateway.port}/ws?appid=console-app&token={body['token']}"
    async with websockets.connect(url) as ws:
        hello = await recv(ws)
        assert hello["type"] == "connection_established"
        await assert_pong(ws)


async def test_token_route_absent_without_debug(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings.model_copy(update={"debug": False}))
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        reply = await http.post("/v1/token", json={"appid": APPID})
    assert reply.status_code in (404, 405)
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        assert (await http.get("/healthz")).status_code == 200


# -- CORS and the WebSocket Origin check -----------------------------------------------------


async def test_websocket_origin_is_checked_against_cors_origins(
    settings: Settings, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"cors_origins": "http://good.example"}))
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(gateway.ws_url(), origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(gateway.ws_url(), origin="http://good.example") as ws:
        hello = await recv(ws)
        assert hello["type"] == "connection_established"
        await assert_pong(ws)
    # A client without an Origin header (not a browser) is not subject to the check.
    async with await gateway.connect() as ws:
        await assert_pong(ws)


async def test_http_cors_headers_follow_cors_origins(settings: Settings, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(settings.model_copy(update={"cors_origins": "http://good.example"}))
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        good = await http.get("/healthz", headers={"Origin": "http://good.example"})
        evil = await http.get("/healthz", headers={"Origin": "http://evil.example"})
    assert good.headers.get("access-control-allow-origin") == "http://good.example"
    assert "access-control-allow-origin" not in evil.headers


@pytest.mark.parametrize("path", ["/", "/static/index.html", "/static/console.js"])
async def test_every_path_serving_the_console_sends_its_security_headers(
    gateway: GatewayHandle, path: str
) -> None:
    """``/static/index.html`` served the console without CSP or nosniff (#12 item 12)."""
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        response = await http.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-cache"


async def test_resume_with_a_huge_last_seq_is_refused_and_the_connection_kept(gateway: GatewayHandle) -> None:
    """``last_seq`` 2**64-1 sent the replay into endless invalid XRANGEs, unanswered (#12 item 6)."""
    async with await gateway.connect() as ws:
        record = await judge(ws, ["nobody"])
        session_id = record.messages[0]["session_id"]
        await send(ws, {"type": "resume", "session_id": session_id, "last_seq": 2**64 - 1})
        error = await recv(ws)
        assert_clean_error(error, "invalid_field")
        await assert_pong(ws)
