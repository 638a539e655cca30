"""An agent backed by any OpenAI-compatible chat-completions API, streaming its answer.

::

    LLM_BASE_URL=http://127.0.0.1:11434/v1 LLM_MODEL=llama3.2 \\
        magi-gateway agent llm --name melchior --persona scientist

Each request is one streamed ``POST {LLM_BASE_URL}/chat/completions``: the persona's
prompt as the system message, the user input as the user message. The agent keeps one
HTTP client from ``setup`` to ``close`` (or from its first judgement), so judgements
reuse its connections (and TLS sessions) to the provider. Tokens (and the
reasoning of models that stream it apart) are sent as thinking chunks, grouped at line
and sentence ends, at about 80 characters or every 100 ms. The judgement is the whole
answer without its decision line, ``DECISION: approve|reject|abstain`` (see ``_answer``);
an answer without one has no decision, so the agent does not vote.

Failures become ``AgentError`` (``result_code`` 1) with a short text: ``LLM provider
returned 429: <the provider's message>``, ``LLM provider unreachable: …``, ``LLM stream
stalled for N s`` (no byte for ``LLM_STALL_TIMEOUT_S``), ``LLM answer took longer than
N s`` (``LLM_TIMEOUT_S``, the whole request).

Personas are prompt files: ``scientist`` (MELCHIOR), ``mother`` (BALTHASAR) and ``woman``
(CASPER) ship in ``magi_gateway/agents/personas/``; any other file can be named by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from magi_gateway.agents._answer import ThoughtBatcher, split_decision
from magi_gateway.agents._chat import (
    ChatDelta,
    ChatFormatError,
    SSEDecoder,
    parse_completion,
    parse_event,
    provider_error,
)
from magi_gateway.core.errors import AgentError
from magi_gateway.worker.sdk import Agent, Context, Judgement

__all__ = ["MAGI_PERSONAS", "PERSONAS", "LLMAgent", "LLMSettings", "load_persona"]

logger = logging.getLogger(__name__)

#: Built-in personas, each a prompt file in ``personas/``.
PERSONAS = ("scientist", "mother", "woman")
#: The persona each MAGI name gets when none is given (also accepted as persona names).
MAGI_PERSONAS = {"melchior": "scientist", "balthasar": "mother", "casper": "woman"}

_MAX_ERROR_BODY_BYTES = 64 * 1024
# After the end of the answer: how long, and how many lines, to read on for the end of
# the response, which lets the connection be reused (else it is closed).
_END_WAIT_S = 0.25
_END_MAX_LINES = 64


class LLMSettings(BaseSettings):
    """Where and how to reach the model: ``LLM_*`` variables (and ``.env``), overridable per agent."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    #: The API root; requests go to ``{base_url}/chat/completions``.
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    #: Sent as ``Authorization: Bearer …`` when set (local servers usually need none).
    api_key: SecretStr | None = None
    #: The whole request, from connecting to the last token.
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Longest silence allowed: waiting for the response, and between bytes of the stream.
    stall_timeout_s: float = Field(30.0, gt=0)
    #: Sampling options; unset means the provider's default (and they are not sent).
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


def load_persona(persona: str | Path) -> str:
    """The system prompt of a built-in persona, or of the prompt file at path ``persona``."""
    key = str(persona).strip().lower()
    key = MAGI_PERSONAS.get(key, key)
    if key in PERSONAS:
        builtin = resources.files("magi_gateway.agents") / "personas" / f"{key}.md"
        return builtin.read_text(encoding="utf-8").strip()
    path = Path(persona).expanduser()
    if not path.is_file():
        raise ValueError(
            f"unknown persona {str(persona)!r}: use {', '.join(PERSONAS)} or the path of a prompt file"
        )
    prompt = path.read_text(encoding="utf-8").strip()
    if not prompt:
        raise ValueError(f"persona file {str(path)!r} is empty")
    return prompt


def _seconds(value: float) -> str:
    return f"{value:g}"


def _origin(url: httpx.URL) -> str:
    """Scheme, host and port only: never the path, query or credentials of the URL."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


class LLMAgent(Agent):
    """A persona answered by a chat-completions model."""

    def __init__(
        self,
        name: str,
        persona: str | Path | None = None,
        settings: LLMSettings | None = None,
        *,
        system_prompt: str | None = None,
    ) -> None:
        self.name = name
        _ = self.agent_id  # validate the name now, not at the first request
        if system_prompt is None:
            if persona is None and name.lower() not in MAGI_PERSONAS:
                raise ValueError(f"agent {name!r} needs a persona ({', '.join(PERSONAS)} or a prompt file)")
            system_prompt = load_persona(persona or name)
        self.system_prompt = system_prompt
        self.settings = settings if settings is not None else LLMSettings()
        self.url = httpx.URL(f"{self.settings.base_url}/chat/completions")
        #: The HTTP client judgements share, from ``setup`` (or the first judgement) to ``close``.
        self.http_client: httpx.AsyncClient | None = None

    async def setup(self) -> None:
        """Open the HTTP client (its connections open with the first requests)."""
        self._client()

    async def close(self) -> None:
        """Close the HTTP client and its connections."""
        client, self.http_client = self.http_client, None
        if client is not None:
            await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self.http_client is None:
            settings = self.settings
            timeout = httpx.Timeout(
                settings.stall_timeout_s, connect=settings.connect_timeout_s, pool=settings.connect_timeout_s
            )
            # No cap on connections: each judgement may need its own, as it had before
            # the client was shared (a cap would queue judgements behind each other).
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            self.http_client = httpx.AsyncClient(timeout=timeout, limits=limits)
        return self.http_client

    def request_body(self, user_input: str) -> dict[str, Any]:
        """The JSON body of the chat-completions request for ``user_input``."""
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": user_input},
            ],
            "stream": True,
        }
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        return body

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Stream the model's answer as thinking; return it without its decision line."""
        batcher = ThoughtBatcher()
        answer: list[str] = []

        async def take(delta: ChatDelta) -> None:
            answer.append(delta.content)
            for chunk in batcher.add(delta.reasoning + delta.content):
                await ctx.think(chunk)

        try:
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    await self._stream(user_input, take)
            except TimeoutError as exc:
                limit = _seconds(self.settings.timeout_s)
                raise AgentError(f"LLM answer took longer than {limit} s") from exc
            if not "".join(answer).strip():
                raise AgentError("LLM provider sent an empty answer")
        except AgentError as exc:
            logger.warning("agent %s: %s", self.name, exc)
            raise
        if (rest := batcher.flush()) is not None:
            await ctx.think(rest)
        text, decision = split_decision("".join(answer))
        return Judgement(text, decision=decision, extra={"model": self.settings.model})

    async def _stream(self, user_input: str, take: Callable[[ChatDelta], Awaitable[None]]) -> None:
        """POST the request and hand every event of the answer to ``take``."""
        headers = {"Accept": "text/event-stream"}
        if self.settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.api_key.get_secret_value()}"
        body = self.request_body(user_input)
        client = self._client()
        responded = False
        try:
            async with client.stream("POST", self.url, json=body, headers=headers) as response:
                responded = True
                if response.is_error:
                    reason = provider_error(await _read_some(response), response.reason_phrase)
                    raise AgentError(f"LLM provider returned {response.status_code}: {reason}")
                if response.headers.get("content-type", "").startswith("application/json"):
                    await take(parse_completion(await response.aread()))
                    return
                decoder = SSEDecoder()
                lines = response.aiter_lines()
                async for line in lines:
                    data = decoder.feed(line)
                    if data is not None and await _take_event(data, take):
                        await _read_to_end(lines)
                        return
                if (data := decoder.close()) is not None:
                    await _take_event(data, take)
        except ChatFormatError as exc:
            raise AgentError(str(exc)) from exc
        except httpx.TransportError as exc:
            raise self._transport_error(exc, responded=responded) from exc

    def _transport_error(self, exc: httpx.TransportError, *, responded: bool) -> AgentError:
        settings = self.settings
        where = _origin(self.url)
        if isinstance(exc, httpx.ConnectTimeout):
            return AgentError(
                f"LLM provider unreachable: {where} (no connection within "
                f"{_seconds(settings.connect_timeout_s)} s)"
            )
        if isinstance(exc, httpx.ConnectError):
            return AgentError(f"LLM provider unreachable: {where} ({str(exc) or 'connection failed'})")
        if isinstance(exc, httpx.ReadTimeout):
            if responded:
                return AgentError(f"LLM stream stalled for {_seconds(settings.stall_timeout_s)} s")
            return AgentError(f"LLM provider sent no response for {_seconds(settings.stall_timeout_s)} s")
        return AgentError(f"LLM provider connection failed: {where} ({str(exc) or type(exc).__name__})")


async def _take_event(data: str, take: Callable[[ChatDelta], Awaitable[None]]) -> bool:
    """Hand one event to ``take``; True when it was the end of the answer."""
    delta = parse_event(data)
    if delta.content or delta.reasoning:
        await take(delta)
    return delta.done


async def _read_to_end(lines: AsyncIterator[str]) -> None:
    """Read what follows ``[DONE]`` (normally nothing), so the response completes.

    httpx reuses a connection only after a complete response; a provider that sends
    more, or keeps the stream open, is given up on quickly (its connection is closed).
    """
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(_END_WAIT_S):
            count = 0
            async for _line in lines:
                count += 1
                if count >= _END_MAX_LINES:
                    return


async def _read_some(response: httpx.Response) -> bytes:
    """The start of an error response's body; the rest is not worth waiting for."""
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= _MAX_ERROR_BODY_BYTES:
            break
    return body[:_MAX_ERROR_BODY_BYTES]
