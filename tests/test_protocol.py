"""Client frame parsing and server frame tails (sans-I/O)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magi_gateway.core.errors import FrameTooLarge, ProtocolError, TooManyAgents
from magi_gateway.core.frames import (
    accepted_tail,
    complete_tail,
    encode,
    final_tail,
    stream_tail,
)
from magi_gateway.core.protocol import (
    AGENT_ID_PATTERN,
    Cancel,
    GetAgents,
    JudgementRequest,
    Limits,
    Ping,
    Resume,
    parse_client_frame,
)

LIMITS = Limits()
SID = "0123456789abcdef0123456789abcdef"


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def parse(obj: Any, limits: Limits = LIMITS) -> Any:
    return parse_client_frame(dumps(obj), limits)


def judgement(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "agent_judgement",
        "agent_ids": ["melchior", "balthasar", "casper"],
        "data": {"user_input": "Shall we have tea?"},
    }
    message.update(overrides)
    return message


def error_of(obj: Any, limits: Limits = LIMITS) -> ProtocolError:
    """The error raised for the JSON encoding of ``obj``."""
    return raw_error_of(dumps(obj), limits)


def raw_error_of(frame: str | bytes, limits: Limits = LIMITS) -> ProtocolError:
    """The error raised for the frame ``frame`` as sent."""
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(frame, limits)
    return info.value


# --- every message type ---------------------------------------------------------------------


def test_default_limits() -> None:
    assert LIMITS.max_frame_bytes == 64 * 1024
    assert LIMITS.max_agents == 16
    assert LIMITS.max_input_bytes == 32 * 1024


def test_parse_agent_judgement() -> None:
    message = parse(judgement())
    assert message == JudgementRequest(("melchior", "balthasar", "casper"), "Shall we have tea?", None)
    assert isinstance(message, JudgementRequest)
    assert message.type == "agent_judgement"
    assert message.agent_ids == ("melchior", "balthasar", "casper")
    assert message.request_id is None


def test_parse_agent_judgement_with_request_id_and_extra_fields() -> None:
    message = parse(judgement(request_id="req-1", extra="ignored", data={"user_input": "", "more": 1}))
    assert message == JudgementRequest(("melchior", "balthasar", "casper"), "", "req-1")


def test_parse_agent_judgement_explicit_null_request_id() -> None:
    assert parse(judgement(request_id=None)).request_id is None


def test_parse_agent_judgement_keeps_agent_order() -> None:
    ids = ["c", "a", "b"]
    assert parse(judgement(agent_ids=ids)).agent_ids == ("c", "a", "b")


def test_parse_cancel() -> None:
    message = parse({"type": "cancel", "session_id": SID})
    assert message == Cancel(SID)
    assert message.type == "cancel"


def test_parse_resume() -> None:
    message = parse({"type": "resume", "session_id": SID, "last_seq": 7})
    assert message == Resume(SID, 7)
    assert message.type == "resume"
    assert parse({"type": "resume", "session_id": SID, "last_seq": 0}) == Resume(SID, 0)


def test_parse_ping_and_get_agents() -> None:
    assert parse({"type": "ping"}) == Ping()
    assert parse({"type": "get_agents"}) == GetAgents()
    assert parse({"type": "ping", "extra": [1, 2]}) == Ping()


def test_parse_bytes_frame() -> None:
    assert parse_client_frame(b'{"type":"ping"}', LIMITS) == Ping()
    assert parse_client_frame(dumps(judgement()).encode(), LIMITS) == parse(judgement())


def test_messages_are_frozen() -> None:
    message = parse({"type": "ping"})
    with pytest.raises(AttributeError):
        message.type = "pong"  # type: ignore[misc]


# --- framing errors -------------------------------------------------------------------------


@pytest.mark.parametrize("frame", ["", "{", "not json", '{"type": "ping",}', b"\xff\xfe", "{'type': 'ping'}"])
def test_invalid_json(frame: str | bytes) -> None:
    error = raw_error_of(frame)
    assert error.code == "invalid_json"
    assert str(error) == "Invalid JSON"


def test_deeply_nested_json_is_invalid_json_not_a_crash() -> None:
    assert raw_error_of("[" * 5000 + "]" * 5000).code == "invalid_json"


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], "ping", 1, 1.5, None, True])
def test_non_object_is_invalid_message(value: Any) -> None:
    assert error_of(value).code == "invalid_message"


@pytest.mark.parametrize("obj", [{}, {"agent_ids": ["a"]}, {"type": None}])
def test_missing_type(obj: dict[str, Any]) -> None:
    assert error_of(obj).code == "missing_type"


def test_unknown_type_names_short_types() -> None:
    error = error_of({"type": "pong"})
    assert error.code == "unknown_type"
    assert "pong" in str(error)


@pytest.mark.parametrize(
    "kind",
    ["x" * 65, "y" * 10_000, 12345, ["ping"], {"a": "b"}, True, 1.5],
    ids=["65-chars", "10k-chars", "int", "list", "object", "bool", "float"],
)
def test_unknown_type_does_not_echo_huge_or_odd_types(kind: Any) -> None:
    error = error_of({"type": kind})
    assert error.code == "unknown_type"
    text = str(error)
    assert len(text) < 100
    assert repr(kind) not in text
    if isinstance(kind, str):
        assert kind not in text


def test_unknown_type_is_case_sensitive() -> None:
    assert error_of({"type": "PING"}).code == "unknown_type"


# --- agent_judgement fields -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"type": "agent_judgement", "data": {"user_input": "x"}}, "agent_ids"),
        ({"type": "agent_judgement", "agent_ids": ["a"]}, "data"),
        ({"type": "agent_judgement", "agent_ids": ["a"], "data": {}}, "user_input"),
        ({"type": "agent_judgement", "agent_ids": ["a"], "data": {"input": "x"}}, "user_input"),
    ],
)
def test_judgement_missing_field(obj: dict[str, Any], field: str) -> None:
    error = error_of(obj)
    assert error.code == "missing_field"
    assert field in str(error)


@pytest.mark.parametrize(
    "agent_ids",
    [
        [],
        "melchior",
        {"melchior": 1},
        None,
        42,
        [1],
        [None],
        [["melchior"]],
        ["melchior", 2],
        [""],
        ["has space"],
        ["a:b"],
        ["a/b"],
        ["a{b}"],
        ["-leading-dash"],
        ["_leading"],
        [".leading"],
        ["x" * 65],
        ["ünïcode"],
        ["a\nb"],
        ["melchior", "melchior"],
    ],
)
def test_judgement_invalid_agent_ids(agent_ids: Any) -> None:
    error = error_of(judgement(agent_ids=agent_ids))
    assert type(error) is ProtocolError
    assert error.code == "invalid_field"


@pytest.mark.parametrize("agent_id", ["a", "A", "0", "melchior-1", "x.y_z", "a" * 64, "Z9-._"])
def test_judgement_valid_agent_ids(agent_id: str) -> None:
    assert AGENT_ID_PATTERN.match(agent_id)
    assert parse(judgement(agent_ids=[agent_id])).agent_ids == (agent_id,)


def test_agent_id_with_trailing_newline_rejected() -> None:
    # `$` in a Python regex also matches before a final newline; the id must still be rejected.
    assert error_of(judgement(agent_ids=["melchior\n"])).code == "invalid_field"


def test_judgement_max_agents() -> None:
    sixteen = [f"agent-{i}" for i in range(16)]
    assert len(parse(judgement(agent_ids=sixteen)).agent_ids) == 16
    error = error_of(judgement(agent_ids=[*sixteen, "agent-16"]))
    assert isinstance(error, TooManyAgents)
    assert error.code == "too_many_agents"


def test_judgement_max_agents_follows_limits() -> None:
    limits = Limits(max_agents=2)
    assert len(parse(judgement(agent_ids=["a", "b"]), limits).agent_ids) == 2
    assert error_of(judgement(agent_ids=["a", "b", "c"]), limits).code == "too_many_agents"


@pytest.mark.parametrize("data", ["text", ["user_input"], None, 3])
def test_judgement_data_not_object(data: Any) -> None:
    assert error_of(judgement(data=data)).code == "invalid_field"


@pytest.mark.parametrize("user_input", [None, 3, ["x"], {"text": "x"}, True])
def test_judgement_user_input_not_string(user_input: Any) -> None:
    assert error_of(judgement(data={"user_input": user_input})).code == "invalid_field"


def test_judgement_user_input_limit_is_in_bytes() -> None:
    limits = Limits(max_input_bytes=30)
    assert parse(judgement(data={"user_input": "x" * 30}), limits).user_input == "x" * 30
    assert error_of(judgement(data={"user_input": "x" * 31}), limits).code == "invalid_field"
    # Ten 3-byte characters are 30 bytes: fine. Eleven are 33 bytes: too many.
    assert parse(judgement(data={"user_input": "€" * 10}), limits).user_input == "€" * 10
    assert error_of(judgement(data={"user_input": "€" * 11}), limits).code == "invalid_field"


def test_judgement_user_input_default_limit() -> None:
    big = "x" * (32 * 1024 + 1)
    error = error_of(judgement(data={"user_input": big}))
    assert error.code == "invalid_field"
    assert big not in str(error)


@pytest.mark.parametrize("request_id", [1, 1.5, True, ["r"], {"r": 1}, "", "r" * 129])
def test_judgement_invalid_request_id(request_id: Any) -> None:
    assert error_of(judgement(request_id=request_id)).code == "invalid_field"


def test_judgement_request_id_length_bounds() -> None:
    assert parse(judgement(request_id="r")).request_id == "r"
    assert parse(judgement(request_id="r" * 128)).request_id == "r" * 128


# --- frame size -----------------------------------------------------------------------------


def test_frame_too_large_text() -> None:
    limits = Limits(max_frame_bytes=1024)
    frame = dumps({"type": "ping", "pad": "x" * 2000})
    error = raw_error_of(frame, limits)
    assert isinstance(error, FrameTooLarge)
    assert error.code == "frame_too_large"


def test_frame_too_large_bytes() -> None:
    limits = Limits(max_frame_bytes=1024)
    error = raw_error_of(dumps({"type": "ping", "pad": "x" * 2000}).encode(), limits)
    assert isinstance(error, FrameTooLarge)
    assert error.code == "frame_too_large"


def test_frame_too_large_checked_before_json() -> None:
    assert raw_error_of("{" * 2000, Limits(max_frame_bytes=1024)).code == "frame_too_large"


def test_frame_size_counts_utf8_bytes() -> None:
    limits = Limits(max_frame_bytes=1024)
    base = dumps({"type": "ping", "pad": ""})
    fits = dumps({"type": "ping", "pad": "x" * (1024 - len(base))})
    assert len(fits.encode()) == 1024
    assert parse_client_frame(fits, limits) == Ping()
    assert parse_client_frame(fits.encode(), limits) == Ping()
    # 400 characters, but 1200 bytes.
    wide = dumps({"type": "ping", "pad": "€" * 400})
    assert len(wide) < 1024 < len(wide.encode())
    assert raw_error_of(wide, limits).code == "frame_too_large"


def test_default_frame_limit() -> None:
    frame = dumps({"type": "ping", "pad": "x" * (64 * 1024)})
    assert raw_error_of(frame).code == "frame_too_large"


# --- cancel / resume ------------------------------------------------------------------------


BAD_SESSION_IDS = [
    "",
    "abc",
    SID[:-1],
    SID + "0",
    SID.upper(),
    "g" * 32,
    123,
    None,
    [SID],
]


@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
def test_cancel_bad_session_id(session_id: Any) -> None:
    assert error_of({"type": "cancel", "session_id": session_id}).code == "invalid_field"


@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
def test_resume_bad_session_id(session_id: Any) -> None:
    error = error_of({"type": "resume", "session_id": session_id, "last_seq": 0})
    assert error.code == "invalid_field"


def test_session_id_with_trailing_newline_rejected() -> None:
    assert error_of({"type": "cancel", "session_id": SID + "\n"}).code == "invalid_field"


def test_cancel_missing_session_id() -> None:
    error = error_of({"type": "cancel"})
    assert error.code == "missing_field"
    assert "session_id" in str(error)


def test_resume_missing_fields() -> None:
    error = error_of({"type": "resume", "session_id": SID})
    assert error.code == "missing_field"
    assert "last_seq" in str(error)
    error = error_of({"type": "resume", "last_seq": 0})
    assert error.code == "missing_field"
    assert "session_id" in str(error)


@pytest.mark.parametrize("last_seq", [-1, -100, True, False, 1.0, 0.5, "3", None, [1], 2**53, 2**64 - 1])
def test_resume_invalid_last_seq(last_seq: Any) -> None:
    error = error_of({"type": "resume", "session_id": SID, "last_seq": last_seq})
    assert error.code == "invalid_field"


def test_resume_large_last_seq() -> None:
    assert parse({"type": "resume", "session_id": SID, "last_seq": 2**40}) == Resume(SID, 2**40)


# --- server frames --------------------------------------------------------------------------

HEAD = b'{"type":"x","session_id":"s","seq":1,'


def test_accepted_tail() -> None:
    frame = orjson.loads(HEAD + accepted_tail(("melchior", "casper"), "req-1"))
    assert frame == {
        "type": "x",
        "session_id": "s",
        "seq": 1,
        "agent_ids": ["melchior", "casper"],
        "request_id": "req-1",
    }
    frame = orjson.loads(HEAD + accepted_tail(("a",), None))
    assert frame["agent_ids"] == ["a"]
    assert frame["request_id"] is None


def test_stream_tail() -> None:
    data = {"thinking": 'quote " backslash \\ newline \n ünï €', "n": [1, 2.5, None]}
    frame = orjson.loads(HEAD + stream_tail("melchior", data))
    assert frame == {"type": "x", "session_id": "s", "seq": 1, "agent_id": "melchior", "data": data}


def test_final_tail() -> None:
    data = {"judgement": "ok", "decision": "approve"}
    frame = orjson.loads(HEAD + final_tail("casper", 0, data))
    assert frame == {
        "type": "x",
        "session_id": "s",
        "seq": 1,
        "agent_id": "casper",
        "result_code": 0,
        "data": data,
    }
    frame = orjson.loads(HEAD + final_tail("casper", 2, {"error": "timeout"}))
    assert frame["result_code"] == 2
    assert frame["data"] == {"error": "timeout"}


def test_complete_tail() -> None:
    results = {"melchior": {"result_code": 0, "decision": "approve"}, "casper": {"result_code": 2}}
    frame = orjson.loads(HEAD + complete_tail("approve", results))
    assert frame == {
        "type": "x",
        "session_id": "s",
        "seq": 1,
        "data": {"verdict": "approve", "results": results},
    }


def test_tails_do_not_start_with_brace() -> None:
    for tail in (
        accepted_tail(("a",), None),
        stream_tail("a", {}),
        final_tail("a", 0, {}),
        complete_tail("abstain", {}),
    ):
        assert not tail.startswith(b"{")
        assert tail.endswith(b"}")


def test_encode_is_compact_utf8_json() -> None:
    assert encode({"type": "pong"}) == b'{"type":"pong"}'
    assert orjson.loads(encode({"error": "é", "code": "x"})) == {"error": "é", "code": "x"}


# --- property: only ProtocolError ever escapes ----------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["type", "agent_ids", "data", "user_input", "request_id", "session_id", "last_seq", "x"]
)
_types = st.sampled_from(["agent_judgement", "cancel", "resume", "ping", "get_agents", "", "other"])


@st.composite
def _message_like(draw: st.DrawFn) -> str:
    obj: dict[str, Any] = draw(st.dictionaries(_field_names, _json_values, max_size=6))
    if draw(st.booleans()):
        obj["type"] = draw(_types)
    if draw(st.booleans()):
        obj["agent_ids"] = draw(st.lists(st.text(max_size=70) | _json_scalars, max_size=18))
    if draw(st.booleans()):
        obj["data"] = {"user_input": draw(_json_values)}
    if draw(st.booleans()):
        obj["session_id"] = draw(st.sampled_from([SID, SID.upper(), "x"]) | st.text(max_size=40))
    return dumps(obj)


_frames = st.one_of(
    st.text(),
    st.binary(),
    _json_values.map(dumps),
    _message_like(),
    _message_like().map(str.encode),
)


CLIENT_ERROR_CODES = {
    "invalid_json",
    "invalid_message",
    "missing_type",
    "unknown_type",
    "missing_field",
    "invalid_field",
    "too_many_agents",
    "frame_too_large",
}


@settings(max_examples=400, deadline=None)
@given(frame=_frames, max_frame_bytes=st.sampled_from([64, 1024, 64 * 1024]))
def test_parse_raises_only_protocol_errors(frame: str | bytes, max_frame_bytes: int) -> None:
    limits = Limits(max_frame_bytes=max_frame_bytes, max_agents=16, max_input_bytes=16)
    outcome: object
    try:
        outcome = parse_client_frame(frame, limits)
    except ProtocolError as error:
        outcome = error
    if isinstance(outcome, ProtocolError):
        assert outcome.code in CLIENT_ERROR_CODES
        assert str(outcome)
    else:
        assert isinstance(outcome, JudgementRequest | Cancel | Resume | Ping | GetAgents)
