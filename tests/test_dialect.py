"""The original system's client dialect, sans-I/O (``core.dialect``, its request form in
``core.protocol``, its acknowledgements in ``core.connection``): synchronous unit tests,
with the original frontend's and CLI client's exact frames."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from magi_gateway.agents import AgentsConfigError, demo_agents, load_agents_file
from magi_gateway.core import frames
from magi_gateway.core.connection import ClientProtocol
from magi_gateway.core.dialect import (
    DEFAULT_ALIASES,
    INVALID_JSON,
    OriginalReplies,
    alias_targets,
    message_received,
    parse_aliases,
    resolve_agents,
    voters_frame,
)
from magi_gateway.core.errors import ProtocolError
from magi_gateway.core.ids import AgentId, ConnectionId, SessionId
from magi_gateway.core.protocol import GetVoters, JudgementRequest, Limits, parse_client_frame
from magi_gateway.settings import Settings
from magi_gateway.worker.sdk import declared_aliases

from . import agents_for_tests

MELCHIOR = "d37c1cc8-bcc4-4b73-9f49-a93a30971f2c"
BALTHASAR = "6634d0ec-d700-4a92-9066-4960a0f11927"
CASPER = "89cbe912-25d0-47b0-97da-b25622bfac0d"
TRIO = [MELCHIOR, BALTHASAR, CASPER]
REQUEST = "<user_input>\nShall we have tea?\n</user_input>\n<response>\nYes.\n</response>"
SID = SessionId("0123456789abcdef0123456789abcdef")


def frontend_frame(request_id: str = "5b0b6a43-59a7-4b8a-a7a2-5f3c2f3ac9c1") -> dict[str, Any]:
    """The original frontend's judgement, as it sends it."""
    return {
        "type": "agent_judgement",
        "request_id": request_id,
        "request": REQUEST,
        "timestamp": 1700000000,
        "agents": [{"agent_id": a} for a in TRIO],
    }


def parse(message: dict[str, Any]) -> Any:
    return parse_client_frame(orjson.dumps(message), Limits())


# -- the request form -------------------------------------------------------------------------


def test_the_frontend_form_is_the_same_judgement_as_the_seed_form() -> None:
    original = parse(frontend_frame())
    seed = parse(
        {
            "type": "agent_judgement",
            "agent_ids": TRIO,
            "data": {"user_input": REQUEST},
            "request_id": "5b0b6a43-59a7-4b8a-a7a2-5f3c2f3ac9c1",
        }
    )
    assert isinstance(original, JudgementRequest)
    assert (original.agent_ids, original.user_input, original.request_id) == (
        seed.agent_ids,
        seed.user_input,
        seed.request_id,
    )
    assert original.original
    assert not seed.original
    # What the bridges forward to the original backends: the frame's own fields.
    assert original.extra == {
        "request": REQUEST,
        "timestamp": 1700000000,
        "agents": [{"agent_id": a} for a in TRIO],
    }


def test_the_older_client_form_with_context_and_judgement() -> None:
    both = parse(
        {"type": "agent_judgement", "agents": [{"agent_id": MELCHIOR}], "context": "Tea", "judgement": "Now?"}
    )
    assert both.user_input == "Tea\nNow?"
    assert both.original
    only = parse({"type": "agent_judgement", "agents": [{"agent_id": MELCHIOR}], "context": "Tea"})
    assert only.user_input == "Tea"
    # The seed field names stay with the seed form: agent_ids and data win.
    mixed = parse(
        {"type": "agent_judgement", "agent_ids": ["melchior"], "data": {"user_input": "x"}, "request": "y"}
    )
    assert (mixed.agent_ids, mixed.user_input, mixed.original) == (("melchior",), "x", False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"agents": []}, "agents"),
        ({"agents": [MELCHIOR]}, "agents"),
        ({"agents": [{"id": MELCHIOR}]}, "agents"),
        ({"agents": [{"agent_id": MELCHIOR}, {"agent_id": MELCHIOR}]}, "agents must not repeat"),
        ({"request": 42}, "request"),
    ],
)
def test_bad_original_forms_are_clear_errors(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse({**frontend_frame(), **change})
    assert caught.value.code == "invalid_field"
    assert field in str(caught.value)
    assert caught.value.request_id == "5b0b6a43-59a7-4b8a-a7a2-5f3c2f3ac9c1"


def test_a_frame_with_neither_form_still_names_the_seed_field() -> None:
    with pytest.raises(ProtocolError, match="Missing field: agent_ids"):
        parse({"type": "agent_judgement", "request": "x"})


def test_get_voters() -> None:
    assert parse({"type": "get_voters", "user_input": "Tea?", "request_id": "v-1"}) == GetVoters("v-1")
    assert parse({"type": "get_voters", "user_input": "Tea?"}) == GetVoters()


# -- aliases ----------------------------------------------------------------------------------


def test_the_original_uuids_name_the_demo_trio_by_default() -> None:
    ids = [AgentId(a) for a in TRIO]
    assert resolve_agents(ids, DEFAULT_ALIASES, {}) == ("melchior", "balthasar", "casper")
    assert alias_targets(ids, DEFAULT_ALIASES) == ["melchior", "balthasar", "casper"]
    assert Settings(_env_file=None).agent_alias_map == dict(DEFAULT_ALIASES)  # type: ignore[call-arg]


def test_an_alias_never_hides_a_live_agent_of_that_id() -> None:
    # A pub/sub-era backend serves MELCHIOR under its UUID: it answers, not the demo agent.
    ids = [AgentId(a) for a in TRIO]
    live = {AgentId(MELCHIOR): 1, AgentId("balthasar"): 2}
    assert resolve_agents(ids, DEFAULT_ALIASES, live) == (MELCHIOR, "balthasar", "casper")


def test_two_ids_of_one_agent_stay_two_agents() -> None:
    ids = [AgentId(MELCHIOR), AgentId("melchior")]
    assert resolve_agents(ids, DEFAULT_ALIASES, {AgentId("melchior"): 1}) == (MELCHIOR, "melchior")
    assert alias_targets(ids, DEFAULT_ALIASES) == []
    # Two aliases of one agent: the first gets it, the second keeps its own id.
    assert resolve_agents([AgentId("a"), AgentId("b")], {"a": "x", "b": "x"}, {}) == ("x", "b")


def test_agent_aliases_setting() -> None:
    assert parse_aliases(" a=melchior , b=casper,") == {"a": "melchior", "b": "casper"}
    assert parse_aliases("") == {}
    with pytest.raises(ValueError, match="alias=agent"):
        parse_aliases("melchior")
    assert Settings(_env_file=None, agent_aliases="").agent_alias_map == {}  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="alias=agent"):
        Settings(_env_file=None, agent_aliases="x=")  # type: ignore[call-arg]


def test_gateway_setting_names_are_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    original = {
        "GATEWAY_HOST": "127.0.0.2",
        "GATEWAY_PORT": "9001",
        "GATEWAY_CORS_ORIGINS": "http://frontend.example",
        "GATEWAY_REDIS_HOST": "redis.example",
        "GATEWAY_REDIS_PORT": "6380",
        "GATEWAY_REDIS_DB": "2",
        "GATEWAY_REDIS_PASSWORD": "pw",
        "GATEWAY_SECRET": "magi-gateway-development-secret",
    }
    for name in (
        "HOST",
        "PORT",
        "CORS_ORIGINS",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "REDIS_PASSWORD",
        "FIXED_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in original.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.host, settings.port, settings.cors_origins) == (
        "127.0.0.2",
        9001,
        "http://frontend.example",
    )
    assert settings.redis_dsn == "redis://:pw@redis.example:6380/2"
    assert settings.fixed_secret == "magi-gateway-development-secret"
    # The canonical names win when both are set.
    monkeypatch.setenv("PORT", "9002")
    monkeypatch.setenv("FIXED_SECRET", "canonical")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.port, settings.fixed_secret) == (9002, "canonical")


# -- replies ----------------------------------------------------------------------------------


def replies() -> OriginalReplies:
    resolved = [AgentId("melchior"), AgentId("balthasar")]
    return OriginalReplies.for_request(SID, "req-1", resolved, [AgentId(MELCHIOR), AgentId(BALTHASAR)])


def stored(message_type: Any, seq: int, tail: bytes) -> bytes:
    """A session frame exactly as the append script stores it."""
    return frames.session_head(message_type, SID) + b"%d," % seq + tail


def translate(kind: str, frame: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in replies().translate(kind.encode(), frame, 1700000001.5)]


def response(agent_id: str, status: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": "agent_response",
        "session_id": SID,
        "request_id": "req-1",
        "agent_id": agent_id,
        "status": status,
        "timestamp": 1700000001.5,
        **fields,
        "seq": seq,
    }


def test_accepted_becomes_processing_once_per_agent() -> None:
    tail = frames.accepted_tail([AgentId("melchior"), AgentId("balthasar")], "req-1")
    assert translate("agent_judgement_accepted", stored("agent_judgement_accepted", 1, tail)) == [
        response(MELCHIOR, "processing", 1),
        response(BALTHASAR, "processing", 1),
    ]


def test_a_chunk_becomes_streaming_content() -> None:
    tail = frames.stream_tail("balthasar", {"thinking": "Who could be hurt?"})
    assert translate("agent_judgement_stream", stored("agent_judgement_stream", 4, tail)) == [
        response(BALTHASAR, "streaming", 4, content="Who could be hurt?")
    ]
    no_text = frames.stream_tail("balthasar", {"other": 1})
    assert translate("agent_judgement_stream", stored("agent_judgement_stream", 5, no_text)) == []


@pytest.mark.parametrize(
    ("decision", "tag"), [("approve", "POSITIVE"), ("reject", "NEGATIVE"), ("Reject", "NEGATIVE")]
)
def test_a_final_becomes_its_judgement_with_the_decision_tag_then_completed(decision: str, tag: str) -> None:
    tail = frames.final_tail("melchior", 0, {"judgement": "MELCHIOR-1 has spoken.", "decision": decision})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 7, tail)) == [
        response(MELCHIOR, "streaming", 7, content=f"MELCHIOR-1 has spoken.\n<decision>{tag}</decision>"),
        response(MELCHIOR, "completed", 7),
    ]


def test_a_final_without_a_decision_or_text() -> None:
    abstain = frames.final_tail("melchior", 0, {"judgement": "Nothing to judge.", "decision": "abstain"})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 7, abstain)) == [
        response(MELCHIOR, "streaming", 7, content="Nothing to judge."),
        response(MELCHIOR, "completed", 7),
    ]
    bare = frames.final_tail("melchior", 0, {"decision": "approve"})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 8, bare))[0]["content"] == (
        "<decision>POSITIVE</decision>"
    )
    # A judgement that carries its tag already (an original backend's, through a bridge) keeps one.
    tagged = frames.final_tail(
        "melchior", 0, {"judgement": "x <decision>NEGATIVE</decision>", "decision": "reject"}
    )
    assert translate("agent_judgement_final", stored("agent_judgement_final", 9, tagged))[0]["content"] == (
        "x <decision>NEGATIVE</decision>"
    )
    empty = frames.final_tail("melchior", 0, {})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 10, empty)) == [
        response(MELCHIOR, "completed", 10)
    ]


def test_a_judgement_that_is_the_streamed_text_is_not_sent_twice() -> None:
    # A pub/sub-era backend streams its verdict; the bridge's judgement is that text.
    dialect = replies()
    pieces = ["MELCHIOR reads it. ", "Having weighed it: <deci", "sion>NEGATIVE</decision>"]
    for seq, piece in enumerate(pieces, start=2):
        frame = stored("agent_judgement_stream", seq, frames.stream_tail("melchior", {"thinking": piece}))
        dialect.translate(b"agent_judgement_stream", frame, 1.0)
    tail = frames.final_tail("melchior", 0, {"judgement": "".join(pieces), "decision": "reject"})
    sent = dialect.translate(b"agent_judgement_final", stored("agent_judgement_final", 5, tail), 1.0)
    assert [orjson.loads(f)["status"] for f in sent] == ["completed"]
    # Streamed, but without its tag: the tag alone follows.
    for seq, piece in enumerate(["yes", " indeed"], start=2):
        frame = stored("agent_judgement_stream", seq, frames.stream_tail("balthasar", {"thinking": piece}))
        dialect.translate(b"agent_judgement_stream", frame, 1.0)
    tail = frames.final_tail("balthasar", 0, {"judgement": "yes indeed", "decision": "approve"})
    sent = dialect.translate(b"agent_judgement_final", stored("agent_judgement_final", 8, tail), 1.0)
    assert [orjson.loads(f).get("content") for f in sent] == ["<decision>POSITIVE</decision>", None]
    # A delivery that did not stream it (a resume after the chunks) sends the judgement.
    tail = frames.final_tail("melchior", 0, {"judgement": "".join(pieces), "decision": "reject"})
    sent = replies().translate(b"agent_judgement_final", stored("agent_judgement_final", 5, tail), 1.0)
    assert orjson.loads(sent[0])["content"] == "".join(pieces)


def test_a_failed_final_becomes_an_error() -> None:
    tail = frames.final_tail("balthasar", 2, {"error": "Agent timed out"})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 9, tail)) == [
        response(BALTHASAR, "error", 9, error="Agent timed out")
    ]
    no_text = frames.final_tail("balthasar", 1, {})
    assert translate("agent_judgement_final", stored("agent_judgement_final", 9, no_text))[0]["error"] == (
        "Agent failed (result_code 1)"
    )


def test_the_complete_names_the_client_s_agents() -> None:
    results = {"melchior": {"result_code": 0, "decision": "approve"}, "balthasar": {"result_code": 2}}
    tail = frames.complete_tail("approve", results)
    (complete,) = translate("agent_judgement_complete", stored("agent_judgement_complete", 12, tail))
    assert complete == {
        "type": "agent_judgement_complete",
        "session_id": SID,
        "seq": 12,
        "data": {
            "verdict": "approve",
            "results": {MELCHIOR: results["melchior"], BALTHASAR: results["balthasar"]},
        },
    }


def test_a_stored_frame_grows_by_at_most_the_growth_the_replays_wait_for() -> None:
    # Replays wait for room for what a stored frame becomes: it must not become more.
    big = "x" * 5000
    cases = [
        (
            "agent_judgement_accepted",
            frames.accepted_tail([AgentId("melchior"), AgentId("balthasar")], "req-1"),
        ),
        ("agent_judgement_stream", frames.stream_tail("melchior", {"thinking": "\u0001" * 50})),
        (
            "agent_judgement_final",
            frames.final_tail("melchior", 0, {"judgement": big, "decision": "approve"}),
        ),
        ("agent_judgement_final", frames.final_tail("balthasar", 0, {})),
        ("agent_judgement_final", frames.final_tail("melchior", 1, {"error": big})),
        ("agent_judgement_complete", frames.complete_tail("approve", {"melchior": {"result_code": 0}})),
    ]
    for request_id in ("req-1", "\u0002" * 128, None):
        requested = [AgentId(MELCHIOR), AgentId(BALTHASAR)]
        dialect = OriginalReplies.for_request(
            SID, request_id, [AgentId("melchior"), AgentId("balthasar")], requested
        )
        extra_frames, extra_bytes = dialect.growth
        for kind, tail in cases:
            frame = stored(kind, 2**40, tail)
            sent = dialect.translate(kind.encode(), frame, 1700000001.123456)
            assert len(sent) <= 1 + extra_frames, kind
            assert sum(map(len, sent)) <= len(frame) + extra_bytes, kind


def test_the_dialect_survives_the_session_meta() -> None:
    original = replies()
    assert OriginalReplies.from_meta(SID, original.meta()) == original
    assert OriginalReplies.from_meta(SID, b"") is None


def test_voters_are_the_live_agents_under_the_ids_the_clients_know() -> None:
    live = {AgentId("balthasar"): 1, AgentId("melchior"): 2, AgentId("scribe"): 1}
    voters = orjson.loads(voters_frame(live, DEFAULT_ALIASES, "v-1"))
    assert voters == {
        "type": "get_voters_response",
        "request_id": "v-1",
        "status": "success",
        "voters": [
            {"agent_id": BALTHASAR, "name": "BALTHASAR", "description": "BALTHASAR-2, the mother"},
            {"agent_id": MELCHIOR, "name": "MELCHIOR", "description": "MELCHIOR-1, the scientist"},
            {"agent_id": "scribe", "name": "SCRIBE", "description": ""},
        ],
    }
    # An agent served under the UUID itself is listed once, under it.
    both = orjson.loads(voters_frame({AgentId(MELCHIOR): 1, AgentId("melchior"): 1}, DEFAULT_ALIASES, None))
    assert [v["agent_id"] for v in both["voters"]] == [MELCHIOR, "melchior"]
    assert both["request_id"] is None


# -- the connection's acknowledgements ----------------------------------------------------------


def client() -> ClientProtocol:
    return ClientProtocol(ConnectionId("c1"), "b75fce6f-e8af-4207-9c32-f8166afb4520", Limits())  # type: ignore[arg-type]


def test_a_seed_connection_sees_no_acknowledgements() -> None:
    protocol = client()
    assert protocol.receive(b'{"type": "ping"}', 0.0).ack is None
    seed = orjson.dumps({"type": "agent_judgement", "agent_ids": ["melchior"], "data": {"user_input": "x"}})
    assert protocol.receive(seed, 0.0).ack is None
    bad = protocol.receive(b"{not json", 0.0)
    assert orjson.loads(bad.reply or b"") == {"error": "Invalid JSON", "code": "invalid_json"}
    assert not protocol.original


def test_an_original_connection_is_acknowledged_from_its_first_original_message() -> None:
    protocol = client()
    first = protocol.receive(orjson.dumps(frontend_frame(str(uuid.uuid4()))), 0.0)
    assert first.ack == message_received("agent_judgement")
    assert orjson.loads(first.ack) == {"type": "message_received", "message_type": "agent_judgement"}
    assert isinstance(first.command, JudgementRequest)
    assert protocol.original
    ping = protocol.receive(b'{"type": "ping"}', 0.0)
    assert (ping.ack, ping.reply) == (message_received("ping"), frames.PONG)
    bad = protocol.receive(b"{not json", 0.0)
    assert (bad.ack, bad.reply) == (None, INVALID_JSON)
    assert orjson.loads(INVALID_JSON)["error"] == "Invalid JSON format"
    # Other errors keep their own text and code, unacknowledged.
    missing = protocol.receive(b'{"type": "cancel"}', 0.0)
    assert missing.ack is None
    assert missing.error == "missing_field"


def test_get_voters_makes_a_connection_original() -> None:
    protocol = client()
    received = protocol.receive(b'{"type": "get_voters", "user_input": "Tea?"}', 0.0)
    assert received.ack == message_received("get_voters")
    assert isinstance(received.command, GetVoters)
    assert protocol.original


# -- aliases declared in agents.toml ------------------------------------------------------------


def test_agents_file_entries_declare_aliases(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        f'[[agent]]\nkind = "demo"\nname = "casper"\naliases = ["{CASPER}", "caspar"]\n\n'
        '[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:echo"\naliases = ["echo-2"]\n',
        encoding="utf-8",
    )
    casper, echo = load_agents_file(path)
    assert casper.aliases == (CASPER, "caspar")
    assert echo.aliases == ("echo-2",)
    assert agents_for_tests.echo.aliases == ()  # the imported object is left as it was
    assert declared_aliases([casper, echo]) == {CASPER: "casper", "caspar": "casper", "echo-2": "echo"}


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            'kind = "python"\ntarget = "tests.agents_for_tests:AGENTS"\naliases = ["x"]',
            "aliases need an entry of one agent",
        ),
        ('kind = "demo"\nname = "casper"\naliases = ["not an id"]', "aliases"),
    ],
)
def test_bad_aliases_in_an_agents_file(tmp_path: Path, entry: str, error: str) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(f"[[agent]]\n{entry}\n", encoding="utf-8")
    with pytest.raises(AgentsConfigError, match=error):
        load_agents_file(path)


def test_an_alias_is_one_agent_s() -> None:
    first, second = demo_agents()[:2]
    first.aliases = ("shared",)
    second.aliases = ("shared",)
    with pytest.raises(ValueError, match="'shared' is taken"):
        declared_aliases([first, second])
    second.aliases = (first.name,)
    with pytest.raises(ValueError, match="is taken"):
        declared_aliases([first, second])
