"""The wire format of OpenAI-compatible chat completions, without I/O.

A streamed answer is a ``text/event-stream``: events of ``data: {json}`` lines ended by a
blank line, comment lines (``: keep-alive``) in between, and ``data: [DONE]`` last. Each
JSON event carries ``choices[0].delta.content`` (the answer) and, from some servers,
``delta.reasoning_content`` or ``delta.reasoning`` (the model's thinking before it).
Errors come as a non-2xx response with ``{"error": {"message": …}}`` (or a bare string,
or ``{"detail": …}``), or as a ``data: {"error": …}`` event in the middle of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["ChatDelta", "ChatFormatError", "SSEDecoder", "parse_completion", "parse_event", "provider_error"]

_MAX_ERROR_CHARS = 300


class ChatFormatError(ValueError):
    """The provider sent something that is not the chat-completions format."""


class SSEDecoder:
    """Turns the lines of an event stream into the ``data`` of each event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its line ending); return an event's data once it ends."""
        if not line:
            return self.close()
        if line.startswith(":"):
            return None  # a comment: servers send them as keep-alives
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None  # `event:`, `id:` and `retry:` mean nothing for chat completions

    def close(self) -> str | None:
        """The data of an event the stream ended without a blank line after (or None)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data


@dataclass(frozen=True)
class ChatDelta:
    """What one stream event adds: answer text, reasoning text, or the end."""

    content: str = ""
    reasoning: str = ""
    done: bool = False


def _loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ChatFormatError("LLM provider sent data that is not JSON") from None


def _error_message(payload: Any) -> str | None:
    """The human text of an error payload, whatever the provider's dialect."""
    if not isinstance(payload, dict):
        return None
    for key in ("error", "detail", "message"):
        value = payload.get(key)
        if isinstance(value, dict):
            value = value.get("message") or value.get("msg")
        if isinstance(value, str) and value.strip():
            return value
    return None


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_ERROR_CHARS else flat[: _MAX_ERROR_CHARS - 1] + "…"


def provider_error(body: bytes, reason: str) -> str:
    """A short text for an error response: its JSON message, else its text, else ``reason``."""
    try:
        message = _error_message(orjson.loads(body))
    except orjson.JSONDecodeError:
        message = body.decode("utf-8", "replace") if body.strip() else None
    return _one_line(message or reason or "no details")


def parse_event(data: str) -> ChatDelta:
    """Interpret the data of one stream event."""
    if data.strip() == "[DONE]":
        return ChatDelta(done=True)
    payload = _loads(data)
    if not isinstance(payload, dict):
        raise ChatFormatError("LLM provider sent an event that is not a JSON object")
    if payload.get("error"):
        raise ChatFormatError(f"LLM provider error: {_one_line(_error_message(payload) or 'no details')}")
    choices = payload.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return ChatDelta()  # e.g. a final usage-only event
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        return ChatDelta()
    content = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    return ChatDelta(
        content=content if isinstance(content, str) else "",
        reasoning=reasoning if isinstance(reasoning, str) else "",
    )


def parse_completion(body: bytes) -> ChatDelta:
    """The answer of a provider that ignored ``stream: true`` and sent one JSON object."""
    payload = _loads(body)
    try:
        message = payload["choices"][0]["message"]
        content = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ChatFormatError("LLM provider sent an answer without choices[0].message") from None
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    return ChatDelta(
        content=content if isinstance(content, str) else "",
        reasoning=reasoning if isinstance(reasoning, str) else "",
        done=True,
    )
