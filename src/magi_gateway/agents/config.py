"""Agents configured in a TOML file: ``magi-gateway up --agents agents.toml``.

::

    [[agent]]
    name = "melchior"
    kind = "llm"                  # llm | demo | bench | python
    persona = "scientist"         # built-in name, or a prompt file relative to this file
    model = "gpt-4o-mini"         # optional: LLM_MODEL otherwise
    base_url = "http://127.0.0.1:11434/v1"
    api_key_env = "OPENAI_API_KEY"  # optional: the variable holding the key (LLM_API_KEY otherwise)
    aliases = ["d37c1cc8-bcc4-4b73-9f49-a93a30971f2c"]  # optional: other ids clients use for it

One ``[[agent]]`` table per agent. ``demo``: ``name`` is melchior, balthasar or casper
(``delay_s``). ``bench``: ``name``, ``chunks``, ``chunk_bytes``, ``delay_s``. ``python``:
``target = "package.module:object"`` (an agent, an Agent subclass, or a list of agents;
``name`` picks one of them). ``llm`` also takes ``timeout_s``, ``connect_timeout_s``,
``stall_timeout_s``, ``temperature`` and ``max_tokens``; unset keys come from the ``LLM_*``
variables. Keys never go in the file: name the variable that holds one. Any entry of one
agent takes ``aliases``: ids the worker declares to the gateways for that agent
(``Agent.aliases``; the original system's UUIDs, say), over the gateways' ``AGENT_ALIASES``.
"""

from __future__ import annotations

import copy
import importlib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from magi_gateway.agents.bench import BenchAgent
from magi_gateway.agents.demo import demo_agents
from magi_gateway.agents.llm import LLMAgent, LLMSettings
from magi_gateway.core.protocol import AGENT_ID_PATTERN
from magi_gateway.worker.sdk import Agent

__all__ = ["AgentsConfigError", "import_agents", "load_agents_file", "make_llm_agent", "parse_agents_config"]

#: The values of ``kind``, as error messages list them.
KINDS = ("llm", "demo", "bench", "python")


class AgentsConfigError(ValueError):
    """An agents file, or an agent spec, that cannot be used; the text says why."""


def _agent_name(value: str) -> str:
    if not AGENT_ID_PATTERN.fullmatch(value):
        raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return value


AgentName = Annotated[str, AfterValidator(_agent_name)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _AgentEntry(_Entry):
    aliases: tuple[AgentName, ...] = ()


class LLMEntry(_AgentEntry):
    """``kind = "llm"``: an ``LLMAgent``; unset keys come from the ``LLM_*`` variables."""

    kind: Literal["llm"]
    name: AgentName
    persona: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float | None = None
    connect_timeout_s: float | None = None
    stall_timeout_s: float | None = None
    temperature: float | None = None
    max_tokens: int | None = None


class DemoEntry(_AgentEntry):
    """``kind = "demo"``: one of the offline MAGI demo agents."""

    kind: Literal["demo"]
    name: Literal["melchior", "balthasar", "casper"]
    delay_s: float = Field(0.15, ge=0)


class BenchEntry(_AgentEntry):
    """``kind = "bench"``: the synthetic benchmark agent."""

    kind: Literal["bench"]
    name: AgentName = "bench"
    chunks: int = Field(50, ge=1)
    chunk_bytes: int = Field(100, ge=0)
    delay_s: float = Field(0.0, ge=0)


class PythonEntry(_AgentEntry):
    """``kind = "python"``: agents imported from ``package.module:object``."""

    kind: Literal["python"]
    target: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    name: AgentName | None = None


AgentEntry = Annotated[LLMEntry | DemoEntry | BenchEntry | PythonEntry, Field(discriminator="kind")]


class AgentsFile(_Entry):
    """A whole agents file: one ``[[agent]]`` table per agent."""

    agent: list[AgentEntry] = Field(min_length=1)


def import_agents(target: str) -> list[Agent]:
    """The agents ``package.module:object`` names: an agent, an Agent subclass, or a list."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise AgentsConfigError(f"{target!r} is not of the form package.module:object")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentsConfigError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AgentsConfigError(f"{module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, Agent):
        obj = obj()
    found = list(obj) if isinstance(obj, list | tuple) else [obj]
    if not found or not all(isinstance(item, Agent) for item in found):
        raise AgentsConfigError(f"{target} is not an Agent (see magi_gateway.agent)")
    return found


def make_llm_agent(
    name: str,
    persona: str | None = None,
    *,
    base_dir: Path | None = None,
    api_key_env: str | None = None,
    **overrides: Any,
) -> LLMAgent:
    """An ``LLMAgent`` with ``LLM_*`` settings, ``overrides`` (None values ignored) winning."""
    chosen = {key: value for key, value in overrides.items() if value is not None}
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise AgentsConfigError(f"api_key_env: the environment variable {api_key_env} is not set")
        chosen["api_key"] = key
    try:
        settings = LLMSettings(**chosen)
    except ValidationError as exc:
        raise AgentsConfigError("; ".join(_describe(error) for error in exc.errors())) from None
    try:
        return LLMAgent(name, persona if persona is None else _persona_path(persona, base_dir), settings)
    except ValueError as exc:
        raise AgentsConfigError(str(exc)) from exc


def _persona_path(persona: str, base_dir: Path | None) -> str:
    """A relative prompt-file path, resolved against the agents file's directory."""
    if base_dir is None or Path(persona).is_absolute() or not (base_dir / persona).is_file():
        return persona
    return str(base_dir / persona)


def _build(entry: LLMEntry | DemoEntry | BenchEntry | PythonEntry, base_dir: Path) -> list[Agent]:
    if isinstance(entry, LLMEntry):
        overrides = entry.model_dump(exclude={"kind", "name", "persona", "api_key_env", "aliases"})
        return [
            make_llm_agent(
                entry.name, entry.persona, base_dir=base_dir, api_key_env=entry.api_key_env, **overrides
            )
        ]
    if isinstance(entry, DemoEntry):
        return [a for a in demo_agents(entry.delay_s) if a.name == entry.name]
    if isinstance(entry, BenchEntry):
        return [
            BenchAgent(entry.name, chunks=entry.chunks, chunk_bytes=entry.chunk_bytes, delay_s=entry.delay_s)
        ]
    found = import_agents(entry.target)
    if entry.name is None:
        return found
    chosen = [a for a in found if a.name == entry.name]
    if not chosen:
        raise AgentsConfigError(f"{entry.target} has no agent named {entry.name!r}")
    return chosen


def parse_agents_config(data: dict[str, Any], base_dir: Path) -> list[Agent]:
    """The agents of a parsed agents file; prompt-file paths are relative to ``base_dir``."""
    try:
        parsed = AgentsFile.model_validate(data)
    except ValidationError as exc:
        raise AgentsConfigError("\n".join(_describe(error, data) for error in exc.errors())) from None
    agents: list[Agent] = []
    for index, entry in enumerate(parsed.agent):
        try:
            built = _build(entry, base_dir)
            if entry.aliases:
                if len(built) != 1:
                    raise AgentsConfigError("aliases need an entry of one agent (give its name)")
                built = [copy.copy(built[0])]  # an imported agent object stays as it was
                built[0].aliases = entry.aliases
        except AgentsConfigError as exc:
            raise AgentsConfigError(f"{_where(index, data)}: {exc}") from exc
        for made in built:
            if any(a.name == made.name for a in agents):
                raise AgentsConfigError(f"{_where(index, data)}: agent {made.name!r} is configured twice")
            agents.append(made)
    return agents


def load_agents_file(path: str | Path) -> list[Agent]:
    """The agents configured in the TOML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentsConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
        return parse_agents_config(data, path.resolve().parent)
    except tomllib.TOMLDecodeError as exc:
        raise AgentsConfigError(f"{path}: not valid TOML: {exc}") from exc
    except AgentsConfigError as exc:
        raise AgentsConfigError(f"{path}: {exc}") from exc


def _where(index: int, data: dict[str, Any]) -> str:
    """``[[agent]] #2 ('melchior')``: which table an error is about."""
    entries = data.get("agent")
    entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"[[agent]] #{index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")


def _describe(error: ErrorDetails, data: dict[str, Any] | None = None) -> str:
    """One validation error in the words of the file: which table, which key, what is wrong."""
    loc = list(error["loc"])
    where = ""
    if data is not None:
        if loc[:1] == ["agent"] and len(loc) >= 2 and isinstance(loc[1], int):
            where = f"{_where(loc[1], data)}: "
            loc = loc[2:]
            if loc and loc[0] in KINDS:
                loc = loc[1:]  # the union member pydantic tried, not a key of the file
        elif loc == ["agent"] and error["type"] in {"missing", "too_short"}:
            return "no [[agent]] tables: add one per agent"
        elif loc == ["agent"] and error["type"] == "list_type":
            return "agent must be an array of tables: write [[agent]], not [agent]"
    key = ".".join(str(part) for part in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}unknown key {key!r}"
    if kind == "missing":
        return f"{where}missing key {key!r}"
    if kind in {"union_tag_not_found", "union_tag_invalid"}:
        return f"{where}kind must be one of {', '.join(KINDS)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}{key}: {message}" if key else f"{where}{message}"
