"""The sans-I/O state of the core: delivery decisions, the outbox, notifications, judgement plans.

Synchronous tests, no Redis, no event loop: events in, decisions out.
"""

from __future__ import annotations

import orjson
import pytest

from magi_gateway.core.delivery import Action, SessionDelivery
from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER, ProtocolError
from magi_gateway.core.frames import session_head, stream_tail
from magi_gateway.core.ids import AgentId, ConnectionId, SessionId
from magi_gateway.core.notification import (
    Message,
    chunk_run,
    decode_notification,
    notify_prefix,
    probe_notification,
)
from magi_gateway.core.outbox import Outbox
from magi_gateway.core.session import plan_judgement

SID = SessionId("0123456789abcdef0123456789abcdef")
CID = ConnectionId("c1")


# -- delivery ------------------------------------------------------------------------------------


def test_live_messages_in_order_are_sent_once() -> None:
    state = SessionDelivery(SID, CID)
    for seq in (1, 2, 3):
        assert state.on_notification(seq) is Action.SEND
        state.sent(seq)
    assert state.on_notification(2) is Action.DROP
    assert state.last_seq == 3


def test_a_skipped_seq_asks_for_a_replay_and_notifications_during_it_are_left_to_it() -> None:
    state = SessionDelivery(SID, CID, last_seq=1)
    assert state.on_notification(4) is Action.REPLAY
    assert state.start_replay() is True
    assert state.replaying
    assert state.next_page() == 2
    # While the replay reads, live notifications are dropped: the log has them.
    assert state.on_notification(5) is Action.DROP
    for seq in (2, 3, 4):
        state.sent(seq)
    # Something arrived during the read: the replay must read once more, not hand over.
    assert state.page_read(3, page=10) is False
    assert state.next_page() == 5
    state.sent(5)
    assert state.page_read(1, page=10) is True
    assert not state.replaying
    assert state.on_notification(6) is Action.SEND


def test_a_full_page_means_more_to_read() -> None:
    state = SessionDelivery(SID, CID)
    assert state.start_replay()
    state.next_page()
    assert state.page_read(10, page=10) is False
    assert state.replaying


def test_only_one_replay_runs_and_a_second_request_makes_it_read_again() -> None:
    state = SessionDelivery(SID, CID)
    assert state.start_replay() is True
    state.next_page()
    assert state.start_replay() is False
    assert state.page_read(0, page=10) is False  # the second request is honoured by one more read
    state.next_page()
    assert state.page_read(0, page=10) is True


def test_a_replay_that_ends_early_releases_delivery() -> None:
    state = SessionDelivery(SID, CID, last_seq=3)
    assert state.start_replay()
    state.replay_ended()
    assert not state.replaying
    assert state.on_notification(4) is Action.SEND


# -- outbox --------------------------------------------------------------------------------------


def test_outbox_overflow_requests_a_1013_close_and_drops_the_queue() -> None:
    outbox = Outbox(max_messages=2)
    assert outbox.push(b"a")
    assert outbox.push(b"b")
    assert not outbox.has_room(1)
    assert outbox.push(b"c") is False
    assert outbox.closing
    assert outbox.close_reason is not None
    assert outbox.close_reason[0] == CLOSE_TRY_AGAIN_LATER
    assert len(outbox) == 0
    assert outbox.push(b"d") is False
    assert outbox.has_room(100)  # closing: nobody waits for room any longer


def test_outbox_flushing_close_keeps_what_is_queued_and_first_close_wins() -> None:
    outbox = Outbox(max_messages=4)
    outbox.push(b"a")
    outbox.push(b"b")
    assert outbox.request_close(1012, "Service restart", flush=True) is True
    assert outbox.request_close(4002, "later", flush=False) is False
    assert outbox.close_reason == (1012, "Service restart")
    assert outbox.pop() == b"a"
    assert outbox.take() == [b"b"]
    assert outbox.pop() is None


def test_outbox_low_water_mark() -> None:
    outbox = Outbox(max_messages=4)
    for frame in (b"1", b"2", b"3"):
        outbox.push(frame)
    assert not outbox.below_low_water
    outbox.pop()
    assert outbox.below_low_water


def test_outbox_is_bounded_in_bytes_too() -> None:
    outbox = Outbox(max_messages=100, max_bytes=10)
    assert outbox.push(b"12345")
    assert outbox.push(b"1234")
    assert outbox.queued_bytes == 9
    assert outbox.has_room(1, 1)
    assert not outbox.has_room(1, 2)
    assert not outbox.below_low_water  # 9 of 10 bytes
    assert outbox.pop() == b"12345"
    assert outbox.queued_bytes == 4
    assert outbox.below_low_water
    assert outbox.push(b"123456")
    assert outbox.push(b"x") is False  # 11 bytes: overflow, close 1013
    assert outbox.close_reason is not None
    assert outbox.close_reason[0] == CLOSE_TRY_AGAIN_LATER
    assert outbox.queued_bytes == 0


def test_an_empty_outbox_takes_one_frame_larger_than_its_byte_bound() -> None:
    outbox = Outbox(max_messages=4, max_bytes=10)
    assert outbox.has_room(1, 50)
    assert outbox.push(b"x" * 50)
    assert not outbox.has_room(1, 1)
    assert outbox.take() == [b"x" * 50]
    assert outbox.queued_bytes == 0


def test_a_repeated_resume_only_moves_the_cursor_forward() -> None:
    state = SessionDelivery(SessionId("s"), ConnectionId("c"), last_seq=4)
    state.resumed(2)
    assert state.last_seq == 4
    state.resumed(7)
    assert state.last_seq == 7
    assert state.on_notification(8) is Action.SEND


# -- notifications and frames ------------------------------------------------------------------


def test_notification_round_trip() -> None:
    frame = session_head("agent_judgement_stream", SID) + b"7," + stream_tail("m", {"thinking": "a\nb"})
    assert b"\n" not in frame  # compact JSON escapes newlines: they can separate fields
    data = notify_prefix(SID) + b"7\nagent_judgement_stream\n" + frame
    notification = decode_notification(data)
    assert notification.session_id == SID
    assert not notification.is_probe
    (message,) = notification.messages
    assert message.seq == 7
    assert message.type == b"agent_judgement_stream"
    assert message.frame == frame
    assert orjson.loads(frame) == {
        "type": "agent_judgement_stream",
        "session_id": SID,
        "seq": 7,
        "agent_id": "m",
        "data": {"thinking": "a\nb"},
    }


def test_a_batch_notification_carries_every_message_in_order() -> None:
    data = notify_prefix(SID) + b'3\nagent_judgement_stream\n{}\n4\nagent_judgement_stream\n{"a":1}'
    notification = decode_notification(data)
    assert [(m.seq, m.frame) for m in notification.messages] == [(3, b"{}"), (4, b'{"a":1}')]


def test_probe_notification() -> None:
    notification = decode_notification(probe_notification(b"tok"))
    assert notification.is_probe
    assert notification.messages[0].frame == b"tok"


@pytest.mark.parametrize(
    "data",
    [b"", b"no newlines", b"sid\nNaN\nt\nf", b"\xff\xfe\n1\nt\nf", b"sid\n1\nt", b"sid\n1\nt\nf\n2\nt"],
)
def test_malformed_notifications_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_notification(data)


# -- judgement plan ------------------------------------------------------------------------------


def test_a_run_of_the_next_seqs_is_sent_at_once_and_any_other_is_decided_one_by_one() -> None:
    state = SessionDelivery(SID, CID, last_seq=3)
    assert state.on_run(5, 9) is False  # a gap: one by one (the first asks for a replay)
    assert state.last_seq == 3
    assert state.on_run(4, 9) is True
    assert state.last_seq == 9
    assert state.on_run(4, 9) is False  # sent already
    assert state.start_replay() is True
    assert state.on_run(10, 12) is False  # a replay owns delivery
    assert state.last_seq == 9


def test_an_outbox_takes_a_run_whole_or_not_at_all() -> None:
    outbox = Outbox(max_messages=4, max_bytes=100)
    assert outbox.push(b"a" * 10)
    assert outbox.push_run([b"b" * 10, b"c" * 10], 20) is True
    assert len(outbox) == 3
    assert outbox.queued_bytes == 30
    assert outbox.push_run([b"d", b"e"], 2) is False  # one frame too many: nothing queued
    assert outbox.push_run([b"f" * 71], 71) is False  # one byte too many
    assert (len(outbox), outbox.queued_bytes, outbox.closing) == (3, 30, False)
    assert outbox.take() == [b"a" * 10, b"b" * 10, b"c" * 10]
    outbox.request_close(CLOSE_TRY_AGAIN_LATER, "bye")
    assert outbox.push_run([b"g"], 1) is False


def test_an_empty_outbox_takes_a_run_over_its_bounds_and_nothing_more() -> None:
    # One notification's chunks arrive in one step, before the writer takes any: a client
    # that reads must not be closed for the burst, one that does not is at the next frame.
    outbox = Outbox(max_messages=4, max_bytes=100)
    run = [b"r" * 30] * 6  # six frames, 180 bytes: over both bounds
    assert outbox.push_run(run, 180) is True
    assert (len(outbox), outbox.queued_bytes, outbox.closing) == (6, 180, False)
    assert outbox.push_run([b"s"], 1) is False  # not empty: the bounds hold
    assert outbox.push(b"s") is False
    assert outbox.closing
    assert len(outbox) == 0  # the close drops what was queued


def test_a_notification_of_consecutive_chunks_is_a_run() -> None:
    def message(seq: int, kind: bytes = b"agent_judgement_stream") -> Message:
        return Message(seq, kind, b"frame-%d" % seq)

    assert chunk_run([message(4), message(5), message(6)]) == (
        (4, 6),
        [b"frame-4", b"frame-5", b"frame-6"],
        21,
    )
    assert chunk_run([message(4)]) is None  # one: nothing to gain
    assert chunk_run([message(4), message(6)]) is None  # not consecutive
    assert chunk_run([message(4), message(5, b"agent_judgement_final")]) is None  # not only chunks


def test_plan_queues_served_agents_and_answers_the_others_in_request_order() -> None:
    agents = [AgentId("a"), AgentId("b"), AgentId("c"), AgentId("d")]
    plan = plan_judgement(agents, {AgentId("b"): 2, AgentId("d"): 1, AgentId("c"): 0})
    assert plan.queue == ("b", "d")
    assert plan.no_worker == ("a", "c")
