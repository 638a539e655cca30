"""Agents files (``agents.toml``): loading, clear errors, and ``magi-gateway up --agents``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import typer
import websockets

from magi_gateway.agents import AgentsConfigError, BenchAgent, DemoAgent, LLMAgent, load_agents_file
from magi_gateway.agents.llm import load_persona
from magi_gateway.cli.main import load_agents
from magi_gateway.embedded import free_port

from . import agents_for_tests
from ._support import SECRET, make_token

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "agents.example.toml"


@pytest.fixture(autouse=True)
def _no_llm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LLM_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "agents.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_example_file_is_the_demo_trio() -> None:
    agents = load_agents_file(EXAMPLE)
    assert [a.name for a in agents] == ["melchior", "balthasar", "casper"]
    assert all(isinstance(a, DemoAgent) for a in agents)


def test_the_examples_commented_llm_variant_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [[agent]]")
    path = write(tmp_path, "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[start:]))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    melchior, balthasar, casper = load_agents_file(path)
    assert isinstance(melchior, LLMAgent)
    assert isinstance(balthasar, LLMAgent)
    assert isinstance(casper, LLMAgent)
    assert melchior.system_prompt == load_persona("scientist")
    assert melchior.settings.api_key is not None
    assert melchior.settings.api_key.get_secret_value() == "sk-from-env"
    assert balthasar.settings.api_key is None
    assert str(balthasar.url) == "http://127.0.0.1:11434/v1/chat/completions"
    assert casper.system_prompt == load_persona("woman")
    assert casper.settings.temperature == 0.7


def test_llm_entries_take_the_environment_for_what_they_leave_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_MODEL", "env-model")
    monkeypatch.setenv("LLM_BASE_URL", "http://env:1/v1")
    monkeypatch.setenv("LLM_API_KEY", "sk-env")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "judge.md").write_text("Judge fairly.\n")
    path = write(
        tmp_path,
        '[[agent]]\nname = "judge"\nkind = "llm"\npersona = "prompts/judge.md"\nstall_timeout_s = 3\n'
        '[[agent]]\nname = "melchior"\nkind = "llm"\nmodel = "file-model"\n',
    )
    judge_agent, melchior = load_agents_file(path)
    assert isinstance(judge_agent, LLMAgent)
    assert isinstance(melchior, LLMAgent)
    assert judge_agent.system_prompt == "Judge fairly."  # relative to the file, not the cwd
    assert judge_agent.settings.model == "env-model"
    assert judge_agent.settings.stall_timeout_s == 3
    assert judge_agent.settings.base_url == "http://env:1/v1"
    assert melchior.settings.model == "file-model"
    assert melchior.system_prompt == load_persona("scientist")  # MAGI names have a default persona
    assert melchior.settings.api_key is not None
    assert melchior.settings.api_key.get_secret_value() == "sk-env"


def test_bench_and_python_entries(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[agent]]\nkind = "bench"\nchunks = 3\nchunk_bytes = 30\n'
        '[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:AGENTS"\nname = "klass"\n'
        '[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:echo"\n',
    )
    bench, klass, echo = load_agents_file(path)
    assert isinstance(bench, BenchAgent)
    assert (bench.name, bench.chunks, len(bench.payload)) == ("bench", 3, 30)
    assert isinstance(klass, agents_for_tests.KlassAgent)
    assert echo is agents_for_tests.echo


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[agent]\nname = 1", "not valid TOML"),
        ("", "no [[agent]] tables"),
        ('[agent]\nname = "melchior"\nkind = "demo"', "write [[agent]], not [agent]"),
        ('[[agents]]\nname = "melchior"\nkind = "demo"', "unknown key 'agents'"),
        (
            '[[agent]]\nname = "melchior"',
            "[[agent]] #1 ('melchior'): kind must be one of llm, demo, bench, python",
        ),
        ('[[agent]]\nname = "m"\nkind = "gpt"', "kind must be one of llm, demo, bench, python"),
        ('[[agent]]\nname = "m"\nkind = "llm"\nmodle = "x"', "[[agent]] #1 ('m'): unknown key 'modle'"),
        ('[[agent]]\nkind = "llm"', "[[agent]] #1: missing key 'name'"),
        ('[[agent]]\nname = "two words"\nkind = "llm"', "name: must be 1-64 letters"),
        ('[[agent]]\nname = "melchior"\nkind = "llm"\ntimeout_s = "soon"', "timeout_s: Input should be"),
        ('[[agent]]\nname = "melchior"\nkind = "llm"\ntimeout_s = -1', "timeout_s: Input should be greater"),
        ('[[agent]]\nname = "melchior"\nkind = "llm"\nbase_url = "localhost:1"', "base_url: must be an http"),
        ('[[agent]]\nname = "m"\nkind = "llm"\npersona = "nurse"', "unknown persona 'nurse'"),
        ('[[agent]]\nname = "gpt"\nkind = "llm"', "agent 'gpt' needs a persona"),
        (
            '[[agent]]\nname = "m"\nkind = "llm"\npersona = "mother"\napi_key_env = "MAGI_NO_SUCH_VAR"',
            "MAGI_NO_SUCH_VAR is not set",
        ),
        (
            '[[agent]]\nname = "rei"\nkind = "demo"',
            "name: Input should be 'melchior', 'balthasar' or 'casper'",
        ),
        ('[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:NOT_AN_AGENT"', "is not an Agent"),
        (
            '[[agent]]\nkind = "python"\ntarget = "no_such_module_here:x"',
            "cannot import 'no_such_module_here'",
        ),
        ('[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:missing"', "has no 'missing'"),
        (
            '[[agent]]\nkind = "python"\ntarget = "tests.agents_for_tests:AGENTS"\nname = "x"',
            "no agent named 'x'",
        ),
        (
            '[[agent]]\nname = "casper"\nkind = "demo"\n[[agent]]\nname = "casper"\nkind = "demo"',
            "#2 ('casper'): agent 'casper' is configured twice",
        ),
    ],
)
def test_bad_files_give_clear_errors(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(AgentsConfigError) as caught:
        load_agents_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert error in message
    assert "errors.pydantic.dev" not in message
    assert "Traceback" not in message


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AgentsConfigError, match=r"cannot read .*nothing\.toml: No such file"):
        load_agents_file(tmp_path / "nothing.toml")


def test_the_cli_takes_files_as_specs_and_as_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[[agent]]\nname = "casper"\nkind = "demo"\n')
    agents = load_agents(["melchior", str(path)], chunks=1, chunk_bytes=1, delay_s=0)
    assert [a.name for a in agents] == ["melchior", "casper"]
    agents = load_agents(["balthasar"], chunks=1, chunk_bytes=1, delay_s=0, config=path)
    assert [a.name for a in agents] == ["balthasar", "casper"]
    with pytest.raises(typer.BadParameter, match="cannot read"):
        load_agents([], chunks=1, chunk_bytes=1, delay_s=0, config=tmp_path / "nothing.toml")


# -- `magi-gateway up --agents FILE` as a real process ----------------------------------------


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without Redis settings (so `up` embeds its own) and .env."""
    redis = {"REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in redis}
    return {**env, "FIXED_SECRET": SECRET, **extra}


def test_up_with_a_bad_agents_file_says_why_and_starts_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, '[[agent]]\nname = "melchior"\nkind = "lmm"\n')
    result = subprocess.run(
        [
            *(sys.executable, "-m", "magi_gateway", "up", "--port", str(free_port())),
            *("--data-dir", str(tmp_path), "--no-demo", "--agents", str(path)),
        ],
        cwd=tmp_path,
        env=_environment(COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "kind must be one of llm, demo, bench, python" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "redis").exists()


async def _live_agents(port: int, expected: set[str], timeout: float = 20) -> set[str]:
    """The agents ``get_agents`` reports, once they are ``expected`` (or the timeout passes)."""
    url = f"ws://127.0.0.1:{port}/ws?appid=config-test&token={make_token('config-test')}"
    live: set[str] = set()
    async with websockets.connect(url) as ws:
        assert orjson.loads(await ws.recv())["type"] == "connection_established"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await ws.send(orjson.dumps({"type": "get_agents"}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] == "agents", reply
            live = {a["agent_id"] for a in reply["agents"]}
            if live == expected:
                break
            await asyncio.sleep(0.1)
    return live


async def test_up_runs_the_agents_of_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[agent]]\nname = "melchior"\nkind = "demo"\n'
        '[[agent]]\nname = "casper"\nkind = "demo"\ndelay_s = 0\n',
    )
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "magi_gateway", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")),
        *("--no-demo", "--agents", str(path)),
        cwd=tmp_path,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if process.returncode is not None:
                    break
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        assert process.returncode is None, "up exited early"
        live = await _live_agents(port, {"melchior", "casper"})
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode()
    assert live == {"melchior", "casper"}, text
    assert process.returncode == 0, text
    assert "instance with agents melchior, casper" in text
    assert "--agents melchior,casper" in text
