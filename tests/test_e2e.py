"""End to end with real processes: gateways, workers, ``python main.py`` and the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from magi_gateway.embedded import free_port
from magi_gateway.redis.keys import Keys
from magi_gateway.redis.store import Store

from ._support import (
    SECRET,
    GatewayHandle,
    SessionRecord,
    assert_well_formed,
    collect_sessions,
    judgement_message,
    make_token,
    send,
    spawn_gateway,
    spawn_process,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["melchior", "balthasar", "casper"]
#: Variables that would point `magi-gateway up` at an external Redis or fix its secret.
_EXTERNAL = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD", "FIXED_SECRET")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60) -> str:
    """Run ``python -m magi_gateway ARGS`` to completion; its stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "magi_gateway", *args],
        env=env if env is not None else os.environ.copy(),
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    return output


def clean_env() -> dict[str, str]:
    """This environment without any Redis location or fixed secret."""
    return {k: v for k, v in os.environ.items() if k not in _EXTERNAL}


def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"process exited early ({process.returncode}): {output}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The ppid is the second field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- several gateway processes and a worker process ---------------------------------------------


async def test_two_gateway_processes_and_an_agent_process(
    redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    env = {"REDIS_URL": redis_url, "FIXED_SECRET": SECRET, "REDIS_KEY_PREFIX": key_prefix}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker = spawn_process(["agent", "demo"], env)
        processes.append(worker)
        gateways: list[GatewayHandle] = []
        for _ in range(2):
            handle = await asyncio.to_thread(spawn_gateway, env)
            assert handle.process is not None
            processes.append(handle.process)
            gateways.append(handle)
        store = Store(redis_client, Keys(key_prefix))
        for _ in range(300):
            if sorted(await store.liveness.live_agents()) == sorted(DEMO):
                break
            assert worker.poll() is None, "agent process exited"
            await asyncio.sleep(0.1)
        assert await store.liveness.live_agents() == dict.fromkeys(sorted(DEMO), 1)

        async def client(handle: GatewayHandle, count: int) -> dict[str, SessionRecord]:
            async with await handle.connect() as ws:
                for i in range(count):
                    question = "Should we deploy the untested weapon?" if i % 2 else "Shall we have tea?"
                    await send(ws, judgement_message(DEMO, question))
                return await collect_sessions(ws, count, timeout=30)

        results = await asyncio.gather(client(gateways[0], 2), client(gateways[1], 2), client(gateways[1], 1))
        seen: set[str] = set()
        for records in results:
            assert not seen & set(records)
            seen |= set(records)
            for record in records.values():
                assert_well_formed(record, DEMO)
                assert record.complete["data"]["verdict"] in {"approve", "reject"}
                assert all(f["result_code"] == 0 for f in record.finals.values())
        assert len(seen) == 5
    finally:
        for process in processes:
            stop_process(process)


# -- python main.py -----------------------------------------------------------------------------


def test_python_main_py_serves(redis_url: str, key_prefix: str) -> None:
    port = free_port()
    env = {
        **clean_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "REDIS_URL": redis_url,
        "FIXED_SECRET": SECRET,
        "REDIS_KEY_PREFIX": key_prefix,
    }
    process = subprocess.Popen(
        [sys.executable, "main.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", process)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        stop_process(process)
    assert process.returncode is not None


# -- the CLI ------------------------------------------------------------------------------------


def test_token_command_prints_the_seed_token() -> None:
    before = make_token("my-app", "s3cret")
    printed = cli("token", "my-app", "--secret", "s3cret", env=clean_env()).strip()
    after = make_token("my-app", "s3cret")
    assert printed in {before, after}
    assert re.fullmatch(r"[0-9a-f]{10}", printed)


def test_help_lists_the_commands() -> None:
    output = cli("--help", env={**clean_env(), "COLUMNS": "120"})
    for command in ("up", "serve", "agent", "ask", "token"):
        assert re.search(rf"\b{command}\b", output), (command, output)


def test_up_embedded_redis_gateway_demo_agents_and_ask(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = clean_env()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "magi_gateway",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--no-demo",
        ],
        cwd=tmp_path,  # no .env here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    embedded: list[int] = []
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", up, timeout=60)
        embedded = children_of(up.pid)
        assert embedded, "up started no child process (its embedded Redis)"
        secret = (data_dir / "secret").read_text().strip()
        assert secret
        answer = cli(
            "ask",
            "--url",
            f"ws://127.0.0.1:{port}/ws",
            "--secret",
            secret,
            "Shall we have tea?",
            env={**env, "COLUMNS": "120"},
            cwd=tmp_path,
        )
        for name in ("MELCHIOR", "BALTHASAR", "CASPER", "VERDICT: APPROVE"):
            assert name in answer, answer
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        output = up.stdout.read().decode() if up.stdout else ""
        assert up.returncode == 0, output
        redis_line = re.search(r"redis\s+redis://127\.0\.0\.1:(\d+)/", output)
        assert redis_line, output
        assert not accepts_connections(int(redis_line.group(1)))
        assert not accepts_connections(port)
        for pid in embedded:
            assert not is_running(pid), f"child {pid} of `up` outlived it"
    finally:
        stop_process(up)
        for pid in embedded:  # never leave the embedded server behind, even on failure
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
