"""The README's original WebSocket client example, run as written against a real gateway.

The example hardcodes ``ws://localhost:8000`` and the secret ``your-secret-key``. The
gateway runs as a ``magi-gateway serve`` process with ``FIXED_SECRET=your-secret-key``
on a free port; a shim prepended to the example redirects ``websockets.connect`` from
``localhost:8000`` to that port. The example's own code is not changed.
"""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._support import spawn_gateway, stop_process

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## WebSocket Client Example"
EXAMPLE_SECRET = "your-secret-key"

SHIM = """\
import websockets as _magi_websockets

_magi_original_connect = _magi_websockets.connect


def _magi_redirect(uri, *args, **kwargs):
    uri = uri.replace("ws://localhost:8000/", "ws://127.0.0.1:{port}/", 1)
    return _magi_original_connect(uri, *args, **kwargs)


_magi_websockets.connect = _magi_redirect
# ---- the README example, unchanged ----
"""


def readme_example() -> str:
    """The first ```python block under the client example heading of README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index(HEADING) + len(HEADING)
    found = re.search(r"^```python\n(.*?)^```", text[start:], re.MULTILINE | re.DOTALL)
    assert found is not None, f"no python block under {HEADING!r}"
    return found.group(1)


def test_readme_example_is_the_original() -> None:
    code = readme_example()
    assert 'uri = f"ws://localhost:8000/ws?appid={appid}&token={token}"' in code
    assert 'raw_str = f"{appid}your-secret-key{current_minute}"' in code
    assert '"agent_ids": ["agent1", "agent2"]' in code
    assert "asyncio.run(connect_gateway())" in code


async def test_readme_client_example_runs(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    gateway = await asyncio.to_thread(
        spawn_gateway,
        {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": key_prefix, "FIXED_SECRET": EXAMPLE_SECRET},
    )
    assert gateway.process is not None
    script = tmp_path / "readme_example.py"
    script.write_text(SHIM.format(port=gateway.port) + readme_example(), encoding="utf-8")
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        str(script),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    printed: list[dict[str, Any]] = []
    try:
        assert example.stdout is not None
        # The example loops on recv() forever; read until the session is complete.
        while not printed or printed[-1].get("type") != "agent_judgement_complete":
            line = await asyncio.wait_for(example.stdout.readline(), 15)
            if not line:
                break
            printed.append(ast.literal_eval(line.decode()))
    finally:
        if example.returncode is None:
            example.terminate()
        _out, err = await example.communicate()
        stop_process(gateway.process)
    assert printed, err.decode()
    types = [m.get("type") for m in printed]
    assert types == [
        "connection_established",
        "agent_judgement_accepted",
        "agent_judgement_final",
        "agent_judgement_final",
        "agent_judgement_complete",
    ], (printed, err.decode())
    accepted = printed[1]
    assert accepted["agent_ids"] == ["agent1", "agent2"]
    finals = {m["agent_id"]: m for m in printed if m["type"] == "agent_judgement_final"}
    assert sorted(finals) == ["agent1", "agent2"]
    for final in finals.values():
        assert final["result_code"] == 3
        assert final["data"]["error"]
    assert [m["seq"] for m in printed[1:]] == [1, 2, 3, 4]
    complete = printed[-1]
    assert complete["data"]["verdict"] == "abstain"
    assert complete["data"]["results"] == {"agent1": {"result_code": 3}, "agent2": {"result_code": 3}}
