"""Size limits of agent output (sans-I/O): thinking split into pieces, finals checked.

``MAX_CHUNK_BYTES`` bounds the ``data.thinking`` string of one ``agent_judgement_stream``
message, counted as it is encoded in the frame (UTF-8, JSON escapes included): longer
thinking is cut into several consecutive pieces, only between code points, so the
pieces joined are the text exactly. ``MAX_FINAL_BYTES`` bounds the encoded
``agent_judgement_final`` after its seq; a larger final, or one that cannot be encoded
as JSON, is replaced by a ``result_code`` 1 final saying why (``checked_final``).
"""

from __future__ import annotations

from typing import Any

import orjson

from magi_gateway.core.frames import final_tail
from magi_gateway.core.session import ResultCode

__all__ = ["checked_final", "split_thinking"]

#: The most bytes one code point takes in a JSON string (``\\u001f``).
_MAX_BYTES_PER_CHAR = 6


def _encoded_len(text: str) -> int:
    """Bytes of ``text`` as a JSON string, without its quotes."""
    return len(orjson.dumps(text)) - 2


def split_thinking(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_bytes`` encoded bytes each (one when it fits).

    Raises ``TypeError`` for text JSON cannot carry (a lone surrogate), as encoding would.
    """
    if max_bytes < _MAX_BYTES_PER_CHAR:
        raise ValueError("max_bytes must hold any one code point")
    if len(text) * _MAX_BYTES_PER_CHAR <= max_bytes or _encoded_len(text) <= max_bytes:
        return [text]
    pieces: list[str] = []
    start = 0
    while start < len(text):
        # Each code point takes at least one byte, so no more than max_bytes of them fit.
        # The most that do: interpolate between the longest piece known to fit and the
        # shortest known not to (sizes grow with length), bisect when that stalls.
        fits, fits_size = 0, 0
        fails, fails_size = min(max_bytes, len(text) - start) + 1, 0
        count = fails - 1
        while fails - fits > 1:
            size = _encoded_len(text[start : start + count])
            if size <= max_bytes:
                fits, fits_size = count, size
            else:
                fails, fails_size = count, size
            if not fails_size:
                break  # the longest candidate fits
            guess = fits + (fails - fits) * (max_bytes - fits_size) // (fails_size - fits_size)
            count = guess if fits < guess < fails else (fits + fails) // 2
        pieces.append(text[start : start + fits])
        start += fits
    return pieces


def checked_final(
    agent_id: str, result_code: ResultCode, data: dict[str, Any], max_bytes: int
) -> tuple[ResultCode, dict[str, Any]]:
    """The final to write: ``(result_code, data)`` as given, or a code 1 final saying why not."""
    try:
        size = len(final_tail(agent_id, int(result_code), data))
    except TypeError:
        return ResultCode.AGENT_ERROR, {
            "error": f"Agent '{agent_id}' returned a final that cannot be encoded as JSON"
        }
    if size > max_bytes:
        return ResultCode.AGENT_ERROR, {
            "error": f"Agent '{agent_id}' returned a final of {size} bytes, over the limit of {max_bytes}"
        }
    return result_code, data
