"""RFC 6455 framing for the fast WebSocket driver, sans-I/O: bytes in, messages out.

Only what a server needs: the opening handshake's answer, unmasked server frames,
and a reader of masked client frames (fragmented messages reassembled, control frames
between fragments, UTF-8 of text messages checked). No extension is negotiated (so no
permessage-deflate: nothing to inflate, no deflate bomb). A violation raises
``FrameError`` with the close code to send (1002 protocol error, 1007 bad UTF-8,
1009 too big).

Hand-written rather than taken from ``websockets`` (whose sans-I/O ``Protocol`` the
ASGI path uses): the relay's hot path is writing server frames, which is a two- to
ten-byte header before the payload; frames queued together go out in one write.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final

__all__ = [
    "NO_STATUS",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameReader",
    "accept_key",
    "close_frame",
    "control_frame",
    "parse_close",
    "text_header",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
NO_STATUS: Final = 1005

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_H16: Final = struct.Struct("!BBH")
_H64: Final = struct.Struct("!BBQ")
_MAX_CONTROL: Final = 125


class FrameError(Exception):
    """The client broke the framing rules; close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455


def text_header(length: int) -> bytes:
    """The header of an unfragmented, unmasked text frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return _H16.pack(0x81, 126, length)
    return _H64.pack(0x81, 127, length)


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A ping, pong or close frame (payload at most 125 bytes)."""
    return bytes((0x80 | opcode, len(payload))) + payload[:_MAX_CONTROL]


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit, on a UTF-8 boundary).

    ``NO_STATUS`` (the peer's close had no code) gives a close frame with no payload.
    """
    if code == NO_STATUS:
        return control_frame(OP_CLOSE)
    encoded = reason.encode()[: _MAX_CONTROL - 2].decode(errors="ignore").encode()
    return control_frame(OP_CLOSE, struct.pack("!H", code) + encoded)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a client's close frame."""
    if not payload:
        return NO_STATUS, ""
    if len(payload) < 2:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "Bad close frame")
    (code,) = struct.unpack("!H", payload[:2])
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "Close reason is not UTF-8") from None


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameReader:
    """Reassembles the client's messages from the bytes it sends.

    ``feed`` returns complete ``(opcode, payload)`` pairs in order: text and binary
    messages (reassembled) and control frames. Buffered input is bounded by
    ``max_size`` plus one frame header (overflow policy: close 1009).
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_size", "_opcode", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._opcode: int | None = None  # of the fragmented message being reassembled

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add ``data``; every message and control frame now complete."""
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._next_frame(buffer)
            if frame is None:
                return out
            fin, opcode, payload = frame
            if opcode >= OP_CLOSE:
                out.append((opcode, payload))
            elif opcode == OP_CONTINUATION:
                if self._opcode is None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "Continuation without a message")
                self._add_fragment(payload)
                if fin:
                    out.append(self._message(self._opcode, b"".join(self._fragments)))
                    self._fragments, self._fragments_size, self._opcode = [], 0, None
            else:
                if self._opcode is not None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "New message inside a fragmented one")
                if fin:
                    out.append(self._message(opcode, payload))
                else:
                    self._opcode = opcode
                    self._add_fragment(payload)

    def _add_fragment(self, payload: bytes) -> None:
        self._fragments_size += len(payload)
        if self._fragments_size > self.max_size:
            raise FrameError(CLOSE_TOO_BIG, "Message too big")
        self._fragments.append(payload)

    @staticmethod
    def _message(opcode: int, payload: bytes) -> tuple[int, bytes]:
        if opcode == OP_TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                raise FrameError(CLOSE_INVALID_DATA, "Text message is not UTF-8") from None
        return opcode, payload

    def _next_frame(self, buffer: bytearray) -> tuple[bool, int, bytes] | None:
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "Reserved bits set (no extension was negotiated)")
        if not second & 0x80:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "Client frames must be masked")
        fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise FrameError(CLOSE_PROTOCOL_ERROR, "Unknown opcode")
        start = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            start = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            start = 10
        if opcode >= OP_CLOSE and (length > _MAX_CONTROL or not fin):
            raise FrameError(CLOSE_PROTOCOL_ERROR, "Bad control frame")
        if length > self.max_size:
            raise FrameError(CLOSE_TOO_BIG, "Message too big")
        end = start + 4 + length
        if len(buffer) < end:
            return None
        mask = bytes(buffer[start : start + 4])
        payload = _unmask(bytes(buffer[start + 4 : end]), mask)
        del buffer[:end]
        return fin, opcode, payload
