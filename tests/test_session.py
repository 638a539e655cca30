"""Session bookkeeping (sans-I/O): result codes, decisions, verdicts, delivery order."""

from __future__ import annotations

import re

import pytest

from magi_gateway.core.protocol import Cancel, Limits, parse_client_frame
from magi_gateway.core.session import (
    DECISIONS,
    DeliveryCursor,
    Gap,
    ResultCode,
    compute_verdict,
    new_session_id,
    normalize_decision,
)

# --- ResultCode -----------------------------------------------------------------------------


def test_result_codes_match_design() -> None:
    # DESIGN §2: 0 ok · 1 agent error · 2 timeout · 3 no such agent / no live worker ·
    # 4 cancelled · 5 worker lost and retries exhausted.
    assert {code.name: int(code) for code in ResultCode} == {
        "OK": 0,
        "AGENT_ERROR": 1,
        "TIMEOUT": 2,
        "NO_AGENT": 3,
        "CANCELLED": 4,
        "WORKER_LOST": 5,
    }


def test_result_codes_are_ints_on_the_wire() -> None:
    assert ResultCode.TIMEOUT == 2
    assert ResultCode(4) is ResultCode.CANCELLED
    assert isinstance(ResultCode.OK, int)


# --- normalize_decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("approve", "approve"),
        ("reject", "reject"),
        ("abstain", "abstain"),
        ("APPROVE", "approve"),
        ("Reject", "reject"),
        ("  abstain\n", "abstain"),
        ("approved", None),
        ("yes", None),
        ("", None),
        ("app rove", None),
        (None, None),
        (1, None),
        (True, None),
        (["approve"], None),
        ({"decision": "approve"}, None),
    ],
)
def test_normalize_decision(value: object, expected: str | None) -> None:
    assert normalize_decision(value) == expected


def test_decisions() -> None:
    assert DECISIONS == ("approve", "reject", "abstain")


# --- compute_verdict ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decisions", "verdict"),
    [
        (["approve", "approve", "reject"], "approve"),
        (["reject", "reject", "approve"], "reject"),
        (["approve", "reject"], "abstain"),
        (["approve", "reject", None], "abstain"),
        (["abstain", "abstain", "approve"], "abstain"),
        (["approve"], "approve"),
        (["reject"], "reject"),
        (["abstain"], "abstain"),
        (["approve", None, None], "approve"),
        ([None, "reject", None], "reject"),
        (["approve", "reject", "abstain"], "abstain"),
        (["approve", "approve", "reject", "reject", "abstain"], "abstain"),
        (["approve", "approve", "reject", "abstain"], "approve"),
        (["reject", "reject", "approve", "approve", "reject"], "reject"),
        ([], "abstain"),
        ([None], "abstain"),
        ([None, None, None], "abstain"),
    ],
)
def test_compute_verdict(decisions: list[str | None], verdict: str) -> None:
    assert compute_verdict(decisions) == verdict


def test_compute_verdict_order_independent() -> None:
    assert compute_verdict(["reject", "approve", "approve"]) == "approve"
    assert compute_verdict(["approve", "reject", "approve"]) == "approve"
    assert compute_verdict([None, "approve", "reject", None, "approve"]) == "approve"


def test_compute_verdict_ignores_unknown_values() -> None:
    assert compute_verdict(["approve", "maybe", "maybe"]) == "approve"  # type: ignore[list-item]
    assert compute_verdict(["maybe"]) == "abstain"  # type: ignore[list-item]


def test_compute_verdict_accepts_any_iterable() -> None:
    assert compute_verdict(d for d in ["reject", "reject", None]) == "reject"
    assert compute_verdict(iter(())) == "abstain"


# --- DeliveryCursor -------------------------------------------------------------------------


def test_cursor_starts_at_zero_and_sends_in_order() -> None:
    cursor = DeliveryCursor()
    assert cursor.last_seq == 0
    for seq in range(1, 6):
        assert cursor.offer(seq) is True
        cursor.sent(seq)
        assert cursor.last_seq == seq


def test_cursor_drops_already_sent() -> None:
    cursor = DeliveryCursor()
    cursor.sent(1)
    cursor.sent(2)
    assert cursor.offer(1) is False
    assert cursor.offer(2) is False
    assert cursor.offer(0) is False
    assert cursor.offer(3) is True


def test_cursor_offer_does_not_advance() -> None:
    cursor = DeliveryCursor()
    assert cursor.offer(1) is True
    assert cursor.offer(1) is True
    assert cursor.last_seq == 0


def test_cursor_reports_gap() -> None:
    cursor = DeliveryCursor()
    assert cursor.offer(4) == Gap(1, 3)
    cursor.sent(1)
    assert cursor.offer(4) == Gap(2, 3)
    assert cursor.offer(3) == Gap(2, 2)
    assert cursor.offer(2) is True


def test_cursor_gap_is_not_a_bool() -> None:
    result = DeliveryCursor().offer(3)
    assert isinstance(result, Gap)
    assert result is not True
    assert (result.first, result.last) == (1, 2)


def test_cursor_resume_from_last_seq() -> None:
    cursor = DeliveryCursor(last_seq=7)
    assert cursor.offer(7) is False
    assert cursor.offer(8) is True
    assert cursor.offer(10) == Gap(8, 9)


def test_cursor_sent_never_moves_backwards() -> None:
    cursor = DeliveryCursor()
    cursor.sent(5)
    cursor.sent(3)
    assert cursor.last_seq == 5
    assert cursor.offer(6) is True


def test_cursor_replay_then_live_delivers_each_message_once() -> None:
    """A resume replays the log while live notifications arrive out of step."""
    cursor = DeliveryCursor(last_seq=2)
    delivered: list[int] = []
    log = list(range(1, 11))

    def deliver(seq: int) -> None:
        verdict = cursor.offer(seq)
        if isinstance(verdict, Gap):
            for missing in log[verdict.first - 1 : verdict.last]:
                assert cursor.offer(missing) is True
                delivered.append(missing)
                cursor.sent(missing)
            verdict = cursor.offer(seq)
        if verdict is True:
            delivered.append(seq)
            cursor.sent(seq)

    for seq in [6, 3, 4, 5, 6, 7, 9, 8, 10, 10, 1]:
        deliver(seq)
    assert delivered == list(range(3, 11))


# --- new_session_id -------------------------------------------------------------------------


def test_new_session_id_is_32_lowercase_hex() -> None:
    for _ in range(100):
        assert re.fullmatch(r"[0-9a-f]{32}", new_session_id())


def test_new_session_id_is_unique() -> None:
    ids = {new_session_id() for _ in range(10_000)}
    assert len(ids) == 10_000


def test_new_session_id_is_accepted_by_the_protocol() -> None:
    sid = new_session_id()
    frame = f'{{"type": "cancel", "session_id": "{sid}"}}'
    assert parse_client_frame(frame, Limits()) == Cancel(sid)
