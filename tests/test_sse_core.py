"""``core.sse`` alone (sans-I/O, synchronous): events, credentials, cursors, the client's parser."""

from __future__ import annotations

import pytest

from magi_gateway.core.errors import ProtocolError, http_status
from magi_gateway.core.protocol import MAX_SEQ
from magi_gateway.core.sse import KEEPALIVE, EventReader, ReadEvent, credentials, cursor, event


def test_an_event_carries_the_frame_as_it_is() -> None:
    frame = b'{"type":"agent_judgement_stream","seq":7,"data":{"thinking":"a\\nb"}}'
    assert event(7, b"agent_judgement_stream", frame) == (
        b"id: 7\nevent: agent_judgement_stream\ndata: " + frame + b"\n\n"
    )
    assert KEEPALIVE.startswith(b":")


def test_the_reader_reads_what_event_writes() -> None:
    reader = EventReader()
    text = (KEEPALIVE + event(3, b"agent_judgement_final", b'{"seq":3}')).decode()
    got = [e for line in text.split("\n") if (e := reader.feed(line)) is not None]
    assert got == [ReadEvent("3", "agent_judgement_final", '{"seq":3}')]
    # Several data lines are joined; an event without one is nothing; the default type.
    lines = ["data: a", "data:b", "", "event: x", "", "id: 9", "data: c", ""]
    read = [e for line in lines if (e := reader.feed(line)) is not None]
    assert read == [
        ReadEvent(None, "message", "a\nb"),
        ReadEvent("9", "message", "c"),
    ]


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"authorization": "Bearer a.b.c"}, {}, ("", "a.b.c")),
        ({"authorization": "bearer a.b.c", "x-magi-appid": "app"}, {"token": "t"}, ("app", "a.b.c")),
        ({"x-magi-appid": "app", "x-magi-token": "t"}, {"appid": "q", "token": "u"}, ("app", "t")),
        ({"authorization": "Basic xyz"}, {"appid": "q", "token": "u"}, ("q", "u")),
        ({}, {}, ("", "")),
    ],
)
def test_credentials(headers: dict[str, str], query: dict[str, str], expected: tuple[str, str]) -> None:
    assert credentials(headers, query) == expected


def test_cursors() -> None:
    assert cursor(None, None) == 0
    assert cursor("12", "3") == 12  # the header wins
    assert cursor(None, "3") == 3
    assert cursor(" 5 ", None) == 5
    assert cursor(None, str(MAX_SEQ)) == MAX_SEQ
    for bad in ("-1", "x", "1e3", "٣", str(MAX_SEQ + 1), "9" * 40):
        with pytest.raises(ProtocolError) as caught:
            cursor(None, bad)
        assert caught.value.code == "invalid_field"


def test_http_statuses() -> None:
    assert http_status("auth_failed") == 401
    assert http_status("session_not_found") == 404
    assert http_status("frame_too_large") == 413
    assert http_status("too_many_streams") == 503
    assert http_status("invalid_json") == 400
