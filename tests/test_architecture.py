"""Structural rules of the code base: a sans-I/O core, explicit exports, one key-name module."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import magi_gateway

SPEC = importlib.util.find_spec("magi_gateway")
assert SPEC is not None
assert SPEC.submodule_search_locations is not None
PACKAGE_DIR = Path(next(iter(SPEC.submodule_search_locations)))
ALL_MODULES = sorted(PACKAGE_DIR.rglob("*.py"))

CORE_DIR = PACKAGE_DIR / "core"
#: Every module of the core package, found on disk (not a hand list).
CORE_MODULES = sorted(f"core.{p.stem}" for p in CORE_DIR.glob("*.py") if p.stem != "__init__")
IO_PACKAGES = {"asyncio", "redis", "starlette", "uvicorn", "websockets", "fastapi", "anyio", "httpx"}

_ISOLATED_IMPORT = """
import json, sys, types
package = types.ModuleType("magi_gateway")
package.__path__ = [sys.argv[1]]
sys.modules["magi_gateway"] = package
core = types.ModuleType("magi_gateway.core")
core.__path__ = [sys.argv[1] + "/core"]
sys.modules["magi_gateway.core"] = core
before = set(sys.modules)
import importlib
files = {}
for name in json.loads(sys.argv[2]):
    files[name] = importlib.import_module("magi_gateway." + name).__file__
forbidden = set(json.loads(sys.argv[3]))
print(json.dumps({
    "files": files,
    "io": sorted(m for m in sys.modules if m.split(".")[0] in forbidden),
    "io_before": sorted(m for m in before if m.split(".")[0] in forbidden),
    "package_modules": sorted(m for m in sys.modules if m.startswith("magi_gateway")),
}))
"""


def test_package_dir_is_the_source_tree() -> None:
    assert (PACKAGE_DIR / "__init__.py").is_file()
    assert Path(magi_gateway.__file__).parent == PACKAGE_DIR
    assert len(ALL_MODULES) > 10


def test_core_modules_import_no_io_libraries() -> None:
    """The sans-I/O core loads without asyncio, Redis, or any web framework."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _ISOLATED_IMPORT,
            str(PACKAGE_DIR),
            json.dumps(CORE_MODULES),
            json.dumps(sorted(IO_PACKAGES)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report = json.loads(result.stdout)
    # The real files were loaded, and only them (not the package __init__ and its worker).
    assert report["files"] == {
        name: str(PACKAGE_DIR / (name.replace(".", "/") + ".py")) for name in CORE_MODULES
    }
    assert report["package_modules"] == sorted(
        ["magi_gateway", "magi_gateway.core"] + [f"magi_gateway.{n}" for n in CORE_MODULES]
    )
    assert report["io_before"] == []
    assert report["io"] == []


def test_isolated_import_check_detects_io_imports() -> None:
    """Guard the guard: the same check run on an I/O module reports its imports."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _ISOLATED_IMPORT,
            str(PACKAGE_DIR),
            '["redis.keys", "redis.client"]',
            '["redis"]',
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "redis" in json.loads(result.stdout)["io"]


EXPECTED_ALL = [
    "Agent",
    "AgentError",
    "AuthenticationFailed",
    "BackendUnavailable",
    "Context",
    "FunctionAgent",
    "GatewayError",
    "Judgement",
    "JudgementClosed",
    "ProtocolError",
    "ResultCode",
    "SessionNotFound",
    "Settings",
    "Worker",
    "__version__",
    "agent",
    "compute_verdict",
]


def test_package_all_is_pinned() -> None:
    assert magi_gateway.__all__ == EXPECTED_ALL
    assert sorted(magi_gateway.__all__) == magi_gateway.__all__
    for name in magi_gateway.__all__:
        assert hasattr(magi_gateway, name), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from magi_gateway import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == EXPECTED_ALL


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


PUBLIC_MODULES = [
    path
    for path in ALL_MODULES
    if path.name == "__init__.py" or not path.name.startswith("_")
    if not any(part.startswith("_") for part in path.relative_to(PACKAGE_DIR).parts[:-1])
]


def _defined_all(path: Path) -> list[str] | None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = ast.literal_eval(node.value)  # type: ignore[arg-type]
            return list(value)
    return None


@pytest.mark.parametrize("path", PUBLIC_MODULES, ids=_module_name)
def test_public_module_defines_all(path: Path) -> None:
    exported = _defined_all(path)
    assert exported is not None, f"{_module_name(path)} has no literal __all__"
    assert len(set(exported)) == len(exported)


def test_public_modules_are_found() -> None:
    names = {_module_name(p) for p in PUBLIC_MODULES}
    assert {
        "magi_gateway",
        "magi_gateway.core.protocol",
        "magi_gateway.redis.keys",
        "magi_gateway.agents",
    } <= names
    assert "magi_gateway.cli._terminal" not in names
    assert "magi_gateway.__main__" not in names


# Things that look like a Redis key name being built outside keys.py: the key prefix
# followed by a colon in an f-string, or a literal starting with the default prefix.
KEY_LITERAL_PATTERNS = [
    re.compile(r"\{[^{}]*prefix[^{}]*\}:"),
    re.compile(r"""["']magi:"""),
    re.compile(r""":(?:s|a|idem|gw):\{"""),
    re.compile(r""":(?:log|seq|meta|pending|results|requests|workers)["']"""),
]


def _key_literals(source: str) -> list[str]:
    return [m.group(0) for pattern in KEY_LITERAL_PATTERNS for m in pattern.finditer(source)]


def test_key_literal_patterns_match_keys_py() -> None:
    """Guard the guard: keys.py itself is full of such literals."""
    assert len(_key_literals((PACKAGE_DIR / "redis" / "keys.py").read_text(encoding="utf-8"))) >= 5


@pytest.mark.parametrize("path", [p for p in ALL_MODULES if p.name != "keys.py"], ids=_module_name)
def test_redis_key_names_only_in_keys_module(path: Path) -> None:
    assert _key_literals(path.read_text(encoding="utf-8")) == []


#: One concept per module, about 350 lines at most (STYLE.md).
_MAX_LINES = 350
#: Longer modules, each with its bound and its reason.
_LONGER: dict[str, tuple[int, str]] = {
    "magi_gateway.client": (
        420,
        "MagiClient is one state machine (connect, resume, match replies, reconnect);"
        " its token handling is already in _client_tokens",
    ),
    "magi_gateway.redis.store": (
        380,
        "a session's keys and its one append script: create, append, complete and read;"
        " deadlines, signals, chunks, intake and idempotency are split out",
    ),
    "magi_gateway.worker.runner": (
        380,
        "one worker's lifecycle: read in turn, take over, cancel, serve, drain;"
        " chunks and acks are split out (appender, _finisher)",
    ),
}


@pytest.mark.parametrize("path", ALL_MODULES, ids=_module_name)
def test_module_at_most_350_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    bound, _reason = _LONGER.get(_module_name(path), (_MAX_LINES, ""))
    assert lines <= bound, f"{_module_name(path)} has {lines} lines"


def test_longer_modules_are_still_longer() -> None:
    """An exception that is no longer needed is removed."""
    for name, (_bound, reason) in _LONGER.items():
        path = PACKAGE_DIR.parent / (name.replace(".", "/") + ".py")
        assert reason
        assert len(path.read_text(encoding="utf-8").splitlines()) > _MAX_LINES, name


def test_import_contracts_hold() -> None:
    """The import-linter contracts of pyproject.toml (core sans-I/O, arrows one way) are kept."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE_DIR.parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_the_command_line_loads_without_the_bench_extra() -> None:
    """``pip install -e .`` then ``magi-gateway up``: picows comes only with [bench]/[test]."""
    code = "import sys; sys.modules['picows'] = None; import magi_gateway.cli.main"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
