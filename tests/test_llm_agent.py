"""The LLM agent against a real local server speaking the streaming chat-completions API.

The fake provider is a Starlette app on uvicorn (port 0, in the test's event loop) that
answers ``POST /v1/chat/completions`` as OpenAI does: server-sent events of
``chat.completion.chunk`` objects, keep-alive comments, then ``data: [DONE]``. Each test
picks its behaviour (``FakeLLM.mode``) and reads back the requests it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from magi_gateway.agents import LLMAgent, LLMSettings
from magi_gateway.agents._answer import NO_EXPLANATION, ThoughtBatcher, split_decision
from magi_gateway.agents._chat import ChatFormatError, SSEDecoder, parse_event, provider_error
from magi_gateway.agents.llm import load_persona
from magi_gateway.cli.main import load_agents
from magi_gateway.embedded import free_port
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import LEAK_MARKERS, GatewayHandle, SessionRecord, assert_well_formed, judge, recv, send

ROOT = Path(__file__).resolve().parents[1]
MODEL = "magi-test-model"
API_KEY = "sk-test-123"
QUESTION = "Should we deploy the untested weapon?"
ANSWER = (
    "The weapon has never been tested outside a simulation. "
    "Deploying it now would be a guess, and the risk is not reversible.\n\n"
    "DECISION: reject\n"
)
ANSWER_TEXT = (
    "The weapon has never been tested outside a simulation. "
    "Deploying it now would be a guess, and the risk is not reversible."
)
NO_DECISION_ANSWER = "I cannot tell: the request says too little about what is at stake."

StartWorker = Callable[..., Awaitable[Worker]]


@dataclass
class Received:
    """One request the fake provider got."""

    headers: dict[str, str]
    body: dict[str, Any]
    #: The client's (host, port): one per TCP connection.
    peer: tuple[str, int] | None = None


@dataclass
class FakeLLM:
    """A chat-completions provider whose behaviour each test chooses."""

    mode: str = "answer"
    answers: dict[str, str] = field(default_factory=dict)  # persona first line -> answer
    requests: list[Received] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"])])

    async def chat_completions(self, request: Request) -> Response:
        body = await request.json()
        peer = (request.client.host, request.client.port) if request.client is not None else None
        self.requests.append(Received(dict(request.headers), body, peer))
        if self.mode in {"429", "500"}:
            message = {"429": "Rate limit exceeded", "500": "The server had an error"}[self.mode]
            error = {"message": message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}
            return JSONResponse({"error": error}, status_code=int(self.mode))
        if self.mode == "slow_headers":
            await self._wait_for_disconnect(request)
            return Response(status_code=204)
        if self.mode == "json":
            message = {"role": "assistant", "content": ANSWER}
            return JSONResponse({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})
        if self.mode in {"garbage", "empty", "broken"}:
            return StreamingResponse(self._bad_events(), media_type="text/event-stream")
        system = body["messages"][0]["content"].splitlines()[0]
        answer = self.answers.get(system, NO_DECISION_ANSWER if self.mode == "no_decision" else ANSWER)
        return StreamingResponse(self._events(request, answer), media_type="text/event-stream")

    async def _events(self, request: Request, answer: str) -> AsyncIterator[str]:
        try:
            yield ": keep-alive\n\n"
            yield _event({"role": "assistant", "content": ""})
            pieces = [answer[i : i + 5] for i in range(0, len(answer), 5)]
            for index, piece in enumerate(pieces):
                if self.mode == "stall" and index == len(pieces) // 2:
                    await self._wait_for_disconnect(request)
                    return
                if self.mode == "stream_error" and index == 3:
                    yield (
                        "data: " + orjson.dumps({"error": {"message": "Model overloaded"}}).decode() + "\n\n"
                    )
                    return
                yield _event({"content": piece})
                await asyncio.sleep(0.002)
            if self.mode == "no_done":
                yield _event({}, finish_reason="stop").rstrip("\n")  # and the server hangs up
                return
            yield _event({}, finish_reason="stop")
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnected.set()  # the client hung up before the end of the answer
            raise

    async def _bad_events(self) -> AsyncIterator[str]:
        yield _event({"role": "assistant", "content": ""})
        if self.mode == "garbage":
            yield "data: <html>Bad gateway</html>\n\n"
        elif self.mode == "broken":
            yield _event({"content": "I was about to"})
            raise ConnectionAbortedError("the fake provider drops the connection mid-answer")
        yield "data: [DONE]\n\n"

    async def _wait_for_disconnect(self, request: Request) -> None:
        """Send nothing until the client hangs up (or 30 s pass)."""
        with contextlib.suppress(TimeoutError):
            # The body was read: the next ASGI message is the disconnect.
            if (await asyncio.wait_for(request.receive(), 30))["type"] == "http.disconnect":
                self.disconnected.set()


def _event(delta: dict[str, Any], finish_reason: str | None = None) -> str:
    chunk = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return "data: " + orjson.dumps(chunk).decode() + "\n\n"


@pytest.fixture(autouse=True)
def _no_llm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LLM_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    config = uvicorn.Config(
        fake.app(), host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    fake.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.should_exit = True
        await task


def llm_settings(base_url: str, **overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "base_url": base_url,
        "model": MODEL,
        "api_key": API_KEY,
        "stall_timeout_s": 0.5,
        "connect_timeout_s": 2,
        "timeout_s": 8,
        **overrides,
    }
    return LLMSettings(_env_file=None, **values)  # type: ignore[call-arg]


def thinking(record: SessionRecord, agent_id: str) -> list[str]:
    return [
        m["data"]["thinking"] for m in record.of_type("agent_judgement_stream") if m["agent_id"] == agent_id
    ]


def assert_no_leaks(record: SessionRecord) -> None:
    text = orjson.dumps(record.messages).decode()
    for marker in (*LEAK_MARKERS, "httpx", "httpcore", API_KEY):
        assert marker not in text, marker


# -- through a real gateway and worker --------------------------------------------------------


async def test_answer_streams_as_thinking_and_the_decision_is_parsed(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    await start_worker([LLMAgent("melchior", "scientist", llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert_well_formed(record, ["melchior"])
    chunks = thinking(record, "melchior")
    assert "".join(chunks) == ANSWER  # every token streamed, in order, none lost
    assert 3 <= len(chunks) < len(ANSWER) // 5  # grouped, not one frame per token
    # Cut at the sentence end, or earlier when a slow machine lets the 100 ms age limit
    # pass first (exact boundaries are pinned with a fake clock in test_thought_batcher_rules).
    first_sentence = "The weapon has never been tested outside a simulation. "
    assert chunks[0]
    assert first_sentence.startswith(chunks[0])
    final = record.finals["melchior"]
    assert final["result_code"] == 0
    assert final["data"] == {"judgement": ANSWER_TEXT, "decision": "reject", "model": MODEL}
    assert record.complete["data"] == {
        "verdict": "reject",
        "results": {"melchior": {"result_code": 0, "decision": "reject"}},
    }
    (received,) = fake_llm.requests
    assert received.headers["authorization"] == f"Bearer {API_KEY}"
    assert received.headers["content-type"] == "application/json"
    assert received.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": load_persona("scientist")},
            {"role": "user", "content": QUESTION},
        ],
        "stream": True,
    }


async def test_three_personas_vote(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.answers = {
        load_persona("mother").splitlines()[0]: "Nobody is hurt by tea.\nDecision: **Approve**",
        load_persona("woman").splitlines()[0]: "I would like that.\n\nDECISION: approved.",
    }
    settings = llm_settings(fake_llm.base_url, temperature=0.2, max_tokens=200, api_key=None)
    agents = [LLMAgent(name, settings=settings) for name in ("melchior", "balthasar", "casper")]
    await start_worker(agents)
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior", "balthasar", "casper"], "Shall we have tea?")
    assert_well_formed(record, ["melchior", "balthasar", "casper"])
    decisions = {agent: final["data"]["decision"] for agent, final in record.finals.items()}
    assert decisions == {"melchior": "reject", "balthasar": "approve", "casper": "approve"}
    assert record.finals["balthasar"]["data"]["judgement"] == "Nobody is hurt by tea."
    assert record.finals["casper"]["data"]["judgement"] == "I would like that."
    assert record.complete["data"]["verdict"] == "approve"
    prompts = {r.body["messages"][0]["content"] for r in fake_llm.requests}
    assert prompts == {load_persona(p) for p in ("scientist", "mother", "woman")}
    for received in fake_llm.requests:
        assert "authorization" not in received.headers  # no key, no header (local servers)
        assert received.body["temperature"] == 0.2
        assert received.body["max_tokens"] == 200


async def test_a_stream_that_ends_without_done(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "no_done"
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert record.finals["melchior"]["data"] == {
        "judgement": ANSWER_TEXT,
        "decision": "reject",
        "model": MODEL,
    }


async def test_answer_without_a_decision_line_has_no_decision(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "no_decision"
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert_well_formed(record, ["melchior"])
    final = record.finals["melchior"]
    assert final["result_code"] == 0
    assert final["data"] == {"judgement": NO_DECISION_ANSWER, "model": MODEL}
    assert "".join(thinking(record, "melchior")) == NO_DECISION_ANSWER
    assert record.complete["data"] == {"verdict": "abstain", "results": {"melchior": {"result_code": 0}}}


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("429", "LLM provider returned 429: Rate limit exceeded"),
        ("500", "LLM provider returned 500: The server had an error"),
        ("stream_error", "LLM provider error: Model overloaded"),
    ],
)
async def test_provider_errors_are_result_code_1_with_a_clear_text(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM, mode: str, error: str
) -> None:
    fake_llm.mode = mode
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert_well_formed(record, ["melchior"])
    final = record.finals["melchior"]
    assert final["result_code"] == 1
    assert final["data"] == {"error": error}
    assert record.complete["data"] == {"verdict": "abstain", "results": {"melchior": {"result_code": 1}}}
    assert_no_leaks(record)


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("garbage", "LLM provider sent data that is not JSON"),
        ("empty", "LLM provider sent an empty answer"),
        ("broken", "LLM provider connection failed: http://127.0.0.1:"),
    ],
)
async def test_broken_answers_are_result_code_1(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM, mode: str, error: str
) -> None:
    fake_llm.mode = mode
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert_well_formed(record, ["melchior"])
    final = record.finals["melchior"]
    assert final["result_code"] == 1
    assert final["data"]["error"].startswith(error)
    assert_no_leaks(record)


async def test_a_stalled_stream_fails_after_the_stall_timeout(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "stall"
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        started = time.monotonic()
        record = await judge(ws, ["melchior"], QUESTION)
        elapsed = time.monotonic() - started
    assert_well_formed(record, ["melchior"])
    assert thinking(record, "melchior")  # what came before the stall was streamed
    assert ANSWER.startswith("".join(thinking(record, "melchior")))
    final = record.finals["melchior"]
    assert final["result_code"] == 1
    assert final["data"] == {"error": "LLM stream stalled for 0.5 s"}
    assert elapsed < 5  # the stall timeout, not the judgement timeout (10 s)
    await asyncio.wait_for(fake_llm.disconnected.wait(), 5)  # the agent hung up on the provider
    assert_no_leaks(record)


async def test_a_provider_that_never_answers(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "slow_headers"
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert record.finals["melchior"]["result_code"] == 1
    assert record.finals["melchior"]["data"] == {"error": "LLM provider sent no response for 0.5 s"}


async def test_an_unreachable_provider(gateway: GatewayHandle, start_worker: StartWorker) -> None:
    port = free_port()  # nothing listens there
    await start_worker([LLMAgent("melchior", settings=llm_settings(f"http://127.0.0.1:{port}/v1"))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert_well_formed(record, ["melchior"])
    final = record.finals["melchior"]
    assert final["result_code"] == 1
    assert final["data"]["error"].startswith(f"LLM provider unreachable: http://127.0.0.1:{port} (")
    assert_no_leaks(record)


async def test_the_whole_answer_is_bounded_by_the_request_timeout(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "stall"
    settings = llm_settings(fake_llm.base_url, timeout_s=0.4, stall_timeout_s=5)
    await start_worker([LLMAgent("melchior", settings=settings)])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert record.finals["melchior"]["data"] == {"error": "LLM answer took longer than 0.4 s"}


async def test_cancel_hangs_up_on_the_provider(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "stall"
    settings = llm_settings(fake_llm.base_url, stall_timeout_s=20)
    await start_worker([LLMAgent("melchior", settings=settings)])
    async with await gateway.connect() as ws:
        await send(ws, {"type": "agent_judgement", "agent_ids": ["melchior"], "data": {"user_input": "x"}})
        accepted = await recv(ws)
        assert (await recv(ws))["type"] == "agent_judgement_stream"
        await send(ws, {"type": "cancel", "session_id": accepted["session_id"]})
        while (message := await recv(ws))["type"] != "agent_judgement_final":
            pass
        assert message["result_code"] == 4
    await asyncio.wait_for(fake_llm.disconnected.wait(), 5)


async def test_a_provider_that_ignores_stream_true(
    gateway: GatewayHandle, start_worker: StartWorker, fake_llm: FakeLLM
) -> None:
    fake_llm.mode = "json"
    await start_worker([LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["melchior"], QUESTION)
    assert record.finals["melchior"]["data"] == {
        "judgement": ANSWER_TEXT,
        "decision": "reject",
        "model": MODEL,
    }
    assert "".join(thinking(record, "melchior")) == ANSWER


async def test_judgements_share_one_connection_and_close_ends_it(
    gateway: GatewayHandle, settings: Settings, fake_llm: FakeLLM
) -> None:
    agent = LLMAgent("melchior", settings=llm_settings(fake_llm.base_url))
    worker = Worker([agent], settings)
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(100):  # until the first heartbeat: the gateway then sees the agent live
            if (await worker.store.liveness.live_worker_counts(["melchior"]))["melchior"]:
                break
            await asyncio.sleep(0.02)
        client = agent.http_client
        assert client is not None  # opened by setup, before any request
        assert not client.is_closed
        async with await gateway.connect() as ws:
            for _ in range(2):
                record = await judge(ws, ["melchior"], QUESTION)
                assert record.finals["melchior"]["result_code"] == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    first, second = fake_llm.requests
    assert first.peer is not None
    assert first.peer == second.peer  # one TCP connection (and TLS session) for both
    assert client.is_closed  # the worker's shutdown closed the agent
    assert agent.http_client is None


async def test_agent_llm_command_and_agents_file(
    gateway: GatewayHandle, settings: Settings, redis_url: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """``magi-gateway agent llm --name … --config FILE`` as a real process, env for the rest."""
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "critic.md").write_text("You are a harsh critic.\nEnd with DECISION: reject\n")
    config = tmp_path / "agents.toml"
    config.write_text(
        '[[agent]]\nname = "critic"\nkind = "llm"\npersona = "prompts/critic.md"\n'
        'api_key_env = "CRITIC_KEY"\nmodel = "critic-model"\n'
    )
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "LLM_BASE_URL": fake_llm.base_url,
        "LLM_API_KEY": API_KEY,
        "LLM_STALL_TIMEOUT_S": "5",
        "CRITIC_KEY": "sk-critic",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "magi_gateway", "agent", "llm", "--name", "melchior", "--persona", "scientist"),
        *("--model", MODEL, "--config", str(config)),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with await gateway.connect() as ws:
            for _ in range(300):
                await send(ws, {"type": "get_agents"})
                live = {a["agent_id"] for a in (await recv(ws))["agents"]}
                if live == {"melchior", "critic"} or process.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            record = await judge(ws, ["melchior", "critic"], QUESTION)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, output.decode()
    assert_well_formed(record, ["melchior", "critic"])
    decisions = {a: (f["result_code"], f["data"].get("decision")) for a, f in record.finals.items()}
    assert decisions == {"melchior": (0, "reject"), "critic": (0, "reject")}, record.finals
    by_model = {r.body["model"]: r for r in fake_llm.requests}
    assert by_model[MODEL].headers["authorization"] == f"Bearer {API_KEY}"
    assert by_model[MODEL].body["messages"][0]["content"] == load_persona("scientist")
    assert by_model["critic-model"].headers["authorization"] == "Bearer sk-critic"
    assert by_model["critic-model"].body["messages"][0]["content"].startswith("You are a harsh critic.")


# -- the parts, without I/O -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "text", "decision"),
    [
        ("Fine.\nDECISION: approve", "Fine.", "approve"),
        ("Fine.\ndecision: Reject\n", "Fine.", "reject"),
        ("Fine.\n\n**Decision:** Abstain.", "Fine.", "abstain"),
        ("Fine.\n- DECISION = rejected", "Fine.", "reject"),
        ("DECISION: approve\nOn reflection, no.\nDECISION: reject", "On reflection, no.", "reject"),
        ("My decision: approve", "My decision: approve", None),
        ("Fine.\nDECISION: maybe", "Fine.\nDECISION: maybe", None),
        ("DECISION: approve", NO_EXPLANATION, "approve"),
    ],
)
def test_split_decision(answer: str, text: str, decision: str | None) -> None:
    assert split_decision(answer) == (text, decision)


def test_thought_batcher_rules() -> None:
    now = [0.0]
    batcher = ThoughtBatcher(max_chars=20, max_delay_s=0.1, min_sentence_chars=5, clock=lambda: now[0])
    assert batcher.add("Hello") == []
    assert batcher.add(" there.") == []  # a sentence end waits for the space after it
    assert batcher.add(" How") == ["Hello there. "]
    assert batcher.add(" are\n\n") == ["How are\n\n"]
    assert batcher.add("\n") == []  # whitespace goes with the next chunk
    assert batcher.add("abcdefghij abcdefghijk") == ["\nabcdefghij "]
    now[0] = 0.2
    assert batcher.add("x") == ["abcdefghijkx"]
    assert batcher.add("y" * 45) == ["y" * 20, "y" * 20]
    assert batcher.flush() == "y" * 5
    assert batcher.flush() is None
    assert batcher.add("  ") == []
    assert batcher.flush() is None


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: message", 'data: {"a":', "data:1}", "", "data: [DONE]"]
    events = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    assert events == ['{"a":\n1}']
    assert decoder.close() == "[DONE]"
    assert decoder.close() is None


def test_parse_event_dialects() -> None:
    reasoning = orjson.dumps({"choices": [{"delta": {"reasoning_content": "hmm"}}]}).decode()
    assert parse_event(reasoning).reasoning == "hmm"
    assert parse_event('{"choices": [], "usage": {"total_tokens": 3}}').content == ""
    assert parse_event(" [DONE]").done
    with pytest.raises(ChatFormatError, match="not JSON"):
        parse_event("{oops")
    with pytest.raises(ChatFormatError, match="LLM provider error: boom"):
        parse_event('{"error": "boom"}')


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "Incorrect API key provided"}}', "Incorrect API key provided"),
        (b'{"error": "model \\"x\\" not found"}', 'model "x" not found'),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"<html>\n  Bad   gateway\n</html>", "<html> Bad gateway </html>"),
        (b"", "Service Unavailable"),
        (b"x" * 1000, "x" * 299 + "…"),
    ],
)
def test_provider_error_texts(body: bytes, expected: str) -> None:
    assert provider_error(body, "Service Unavailable") == expected


def test_personas_and_names(tmp_path: Path) -> None:
    assert load_persona("casper") == load_persona("woman")
    for persona in ("scientist", "mother", "woman"):
        assert load_persona(persona).splitlines()[-3:] == [
            "DECISION: approve",
            "DECISION: reject",
            "DECISION: abstain",
        ]
    prompt = tmp_path / "mine.md"
    prompt.write_text("  Be brief.  \n")
    assert LLMAgent("mine", prompt, llm_settings("http://x")).system_prompt == "Be brief."
    prompt.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_persona(prompt)
    with pytest.raises(ValueError, match="unknown persona 'nobody'"):
        load_persona("nobody")
    with pytest.raises(ValueError, match="needs a persona"):
        LLMAgent("gpt", settings=llm_settings("http://x"))
    with pytest.raises(ValueError, match="invalid agent name"):
        LLMAgent("no spaces", "scientist", llm_settings("http://x"))


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_BASE_URL", "http://127.0.0.1:11434/v1/")
    monkeypatch.setenv("LLM_MODEL", "llama3.2")
    monkeypatch.setenv("LLM_API_KEY", "")
    monkeypatch.setenv("LLM_STALL_TIMEOUT_S", "7.5")
    settings = LLMSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.base_url == "http://127.0.0.1:11434/v1"
    assert settings.model == "llama3.2"
    assert settings.api_key is None
    assert settings.stall_timeout_s == 7.5
    agent = LLMAgent("melchior", settings=settings)
    assert str(agent.url) == "http://127.0.0.1:11434/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        LLMSettings(_env_file=None, base_url="localhost:11434")  # type: ignore[call-arg]


def test_cli_llm_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODEL", "from-env")
    (agent,) = load_agents(
        ["llm"], chunks=1, chunk_bytes=1, delay_s=0, name="balthasar", base_url="http://h:1/v1"
    )
    assert isinstance(agent, LLMAgent)
    assert agent.system_prompt == load_persona("mother")
    assert agent.settings.model == "from-env"
    assert agent.settings.base_url == "http://h:1/v1"
    with pytest.raises(typer.BadParameter, match="--name"):
        load_agents(["llm"], chunks=1, chunk_bytes=1, delay_s=0)
    with pytest.raises(typer.BadParameter, match="unknown persona"):
        load_agents(["llm"], chunks=1, chunk_bytes=1, delay_s=0, name="x", persona="nope")
