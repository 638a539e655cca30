"""RFC 6455 framing of the fast driver (core.wsframe), sans-I/O: bytes in, messages out."""

from __future__ import annotations

import os
import struct

import pytest

from magi_gateway.core import wsframe


def client_frame(
    payload: bytes, opcode: int = wsframe.OP_TEXT, *, fin: bool = True, mask: bool = True
) -> bytes:
    """A frame as a client sends it (masked), built independently of the reader."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_accept_key_is_the_rfc_example() -> None:
    assert wsframe.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_headers_carry_the_length(size: int) -> None:
    header = wsframe.text_header(size)
    assert header[0] == 0x81  # FIN + text, unmasked
    if size < 126:
        assert header[1] == size
    elif size < 65536:
        assert header[1] == 126
        assert struct.unpack("!H", header[2:])[0] == size
    else:
        assert header[1] == 127
        assert struct.unpack("!Q", header[2:])[0] == size


@pytest.mark.parametrize("size", [0, 5, 125, 126, 70_000])
def test_messages_of_any_size_survive_any_split(size: int) -> None:
    payload = os.urandom(size).hex().encode()[:size]
    data = client_frame(payload) + client_frame(b'{"type":"ping"}')
    for cut in {1, 2, 3, 7, len(data) // 2, len(data) - 1}:
        reader = wsframe.FrameReader(max_size=1 << 20)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [
            (wsframe.OP_TEXT, payload),
            (wsframe.OP_TEXT, b'{"type":"ping"}'),
        ]


def test_fragments_are_reassembled_around_control_frames() -> None:
    reader = wsframe.FrameReader(max_size=1000)
    data = (
        client_frame(b"hel", fin=False)
        + client_frame(b"ping!", wsframe.OP_PING)
        + client_frame(b"lo", wsframe.OP_CONTINUATION)
    )
    assert reader.feed(data) == [(wsframe.OP_PING, b"ping!"), (wsframe.OP_TEXT, b"hello")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(b"x", mask=False), 1002),
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 (deflate) was not negotiated
        (client_frame(b"x", 0x3), 1002),  # reserved opcode
        (client_frame(b"x", wsframe.OP_CONTINUATION), 1002),
        (client_frame(b"a", fin=False) + client_frame(b"b"), 1002),
        (client_frame(b"x" * 126, wsframe.OP_PING), 1002),
        (client_frame(b"\xff\xfe"), 1007),
        (client_frame(b"x" * 101), 1009),
        (client_frame(b"x" * 60, fin=False) + client_frame(b"x" * 60, wsframe.OP_CONTINUATION), 1009),
    ],
)
def test_violations_name_their_close_code(data: bytes, code: int) -> None:
    reader = wsframe.FrameReader(max_size=100)
    with pytest.raises(wsframe.FrameError) as failed:
        reader.feed(data)
    assert failed.value.code == code


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    reader = wsframe.FrameReader(max_size=100)
    with pytest.raises(wsframe.FrameError) as failed:
        reader.feed(client_frame(b"x" * 70_000)[:14])  # header and mask only: nothing buffered
    assert failed.value.code == 1009


def test_close_frames() -> None:
    assert wsframe.parse_close(struct.pack("!H", 1000) + b"bye") == (1000, "bye")
    assert wsframe.parse_close(b"") == (wsframe.NO_STATUS, "")
    assert wsframe.close_frame(wsframe.NO_STATUS) == bytes((0x88, 0))
    long = wsframe.close_frame(1013, "é" * 100)  # cut to 125 bytes on a UTF-8 boundary
    assert len(long) <= 127
    assert wsframe.parse_close(long[2:])[0] == 1013
    with pytest.raises(wsframe.FrameError):
        wsframe.parse_close(b"\x03")
