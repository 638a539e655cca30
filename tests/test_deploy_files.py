"""The deployment files agree with the published schemas and with the code they deploy.

``deploy/docker-compose.yml`` is checked against the Compose Specification schema (vendored
in check-jsonschema), ``deploy/k8s/`` against Kubernetes' schemas (bundled in
kubernetes-validate, strict: an unknown field is an error). Then against the code: every
command parses with the real CLI and names agents that load, every environment variable is
a real setting with a valid value, health-check and probe paths are real routes, nginx's
upstreams are the compose gateways, selectors, ports and references line up, and grace
periods cover the shutdown drain. ``docker compose config``, ``kubectl kustomize`` and
``nginx -t`` run too when those tools are installed (``MAGI_TEST_NGINX`` names an nginx
binary elsewhere).
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import uvicorn
import uvicorn.config
import yaml
from kubernetes_validate.utils import latest_version
from kubernetes_validate.utils import validate as validate_k8s
from pydantic_settings import BaseSettings
from starlette.routing import Mount

from magi_gateway._tasks import cancel_and_wait
from magi_gateway.agents.llm import LLMSettings
from magi_gateway.cli.main import app as cli_app
from magi_gateway.cli.main import load_agents
from magi_gateway.server import gateway as gateway_module
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
NGINX_CONF = DEPLOY / "nginx.conf"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
#: Not applied by kustomization.yaml: it holds placeholders.
SECRET_EXAMPLE = "secret.example.yaml"
#: The oldest Kubernetes the manifests are written for, and the newest with bundled schemas.
K8S_VERSIONS = ("1.30", latest_version())

#: Environment variables that are not settings of this package but are read by what it runs.
FOREIGN_ENV = {"FORWARDED_ALLOW_IPS": uvicorn.config}


# -- helpers ----------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _env_names(model: type[BaseSettings]) -> set[str]:
    prefix = str(model.model_config.get("env_prefix") or "")
    return {(prefix + name).upper() for name in model.model_fields}


SETTINGS_ENV = _env_names(Settings)
LLM_ENV = _env_names(LLMSettings)
KNOWN_ENV = SETTINGS_ENV | LLM_ENV | set(FOREIGN_ENV)

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?error}`` with nothing set: defaults win,
    required variables get a stand-in value, ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("op") in (":-", "-"):
            return match.group("arg")
        return f"test-{match.group('name').lower()}"

    return _INTERPOLATION.sub(replace, value)


def _interpolated_names(value: str) -> set[str]:
    return {m.group("name") for m in _INTERPOLATION.finditer(value) if m.group("name")}


def _seconds(duration: str | int) -> float:
    """A compose duration (``20s``, ``1m30s``) or a number of seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@functools.cache
def _cli_group() -> Any:
    return typer.main.get_command(cli_app)


def _cli_params(command: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``magi-gateway SUBCOMMAND ...`` with the real command line; raises if it would."""
    assert command[0] == "magi-gateway", command
    group = _cli_group()
    context = group.context_class(group, info_name="magi-gateway")
    name, subcommand, rest = group.resolve_command(context, command[1:])
    assert name is not None
    assert subcommand is not None
    with subcommand.make_context(name, rest) as sub:
        return name, dict(sub.params)


def _agents_of(command: list[str]) -> set[str]:
    """The agent ids a ``magi-gateway agent ...`` command serves, loaded for real."""
    name, params = _cli_params(command)
    assert name == "agent", command
    agents = load_agents(
        params["names"] or [],
        chunks=params["chunks"],
        chunk_bytes=params["chunk_bytes"],
        delay_s=params["delay"],
        config=params["config"],
        name=params["name"],
        persona=params["persona"],
        model=params["model"],
        base_url=params["base_url"],
    )
    assert agents, command
    return {str(agent.agent_id) for agent in agents}


@pytest.fixture(scope="module")
def routes() -> set[str]:
    """Paths the gateway application serves (static mounts as ``/static/``)."""
    application = create_app(Settings(_env_file=None, fixed_secret="x"))  # type: ignore[call-arg]
    paths = set()
    for route in application.routes:
        path = getattr(route, "path", "")
        paths.add(f"{path}/" if isinstance(route, Mount) else path)
    assert {"/ws", "/healthz", "/readyz"} <= paths
    return paths


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No setting leaks in from the outer environment or a stray ``.env``."""
    for name in KNOWN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def _check_values(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], where: str) -> None:
    """The settings objects accept ``env`` exactly as a process would read it."""
    unknown = set(env) - KNOWN_ENV
    assert not unknown, f"{where}: not a setting: {sorted(unknown)}"
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        Settings()
        if set(env) & LLM_ENV:
            LLMSettings()


def _drain_budget_s() -> float:
    """Longest a gateway takes from SIGTERM to exit: close clients, then stop its tasks."""
    close = inspect.signature(gateway_module.Gateway.close_connections).parameters["timeout_s"].default
    return float(close) + gateway_module._STOP_TIMEOUT_S


def _worker_budget_s() -> float:
    """Longest a worker takes from SIGTERM to exit: running requests' grace, then cancel."""
    grace = inspect.signature(Worker.__init__).parameters["grace_s"].default
    cancel = inspect.signature(cancel_and_wait).parameters["timeout_s"].default
    return float(grace) + float(cancel)


def _url_paths(text: str) -> set[str]:
    return set(re.findall(r"https?://[^/\s'\"]+(/[^\s'\"]*)", text))


# -- compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = _yaml(COMPOSE_FILE)
    assert isinstance(document, dict)
    return document


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _magi_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    found = {}
    for name, spec in _services(compose).items():
        build = spec.get("build")
        if build and (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT:
            assert (ROOT / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
            found[name] = spec
    return found


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {name: _interpolate(str(value)) for name, value in env.items()}


def _gateway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _magi_services(compose).items() if _cli_params(s["command"])[0] == "serve"}


def _worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _magi_services(compose).items() if _cli_params(s["command"])[0] == "agent"}


@pytest.fixture(scope="module")
def compose_spec() -> Any:
    """A validator for the Compose Specification schema."""
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text("utf-8")
    )
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.mark.parametrize("path", [COMPOSE_FILE, ROOT / "docker-compose.dev.yml"], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path, compose_spec: Any) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_spec.iter_errors(_yaml(path))
    ]
    assert not errors


def _docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file(compose: dict[str, Any], tmp_path: Path) -> None:
    command = _docker_compose()
    if command is None:
        pytest.skip("no docker compose here (the schema test covers the file)")
    env = {**os.environ, "FIXED_SECRET": "s", "REDIS_PASSWORD": "p"}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "llm", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["services"]) == set(_services(compose))


def test_compose_services_have_images_and_real_commands(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, spec in services.items():
        assert _interpolate(spec.get("image", "")), f"{name} has no image"
    magi = _magi_services(compose)
    assert len(_gateway_services(compose)) == 2
    assert {"nginx", "redis"} <= set(services) - set(magi)
    for spec in magi.values():
        _cli_params(spec["command"])


def test_compose_workers_serve_real_agents_on_separate_queues(compose: dict[str, Any]) -> None:
    """Each worker service loads its agents; no agent id is served by two kinds of worker
    (they would take each other's requests)."""
    served: dict[str, str] = {}
    workers = _worker_services(compose)
    assert {"demo", "llm"} <= {_cli_params(s["command"])[1]["names"][0] for s in workers.values()}
    for name, spec in workers.items():
        for agent_id in _agents_of(spec["command"]):
            assert agent_id not in served, f"{agent_id} served by {served.get(agent_id)} and {name}"
            served[agent_id] = name
    assert {"melchior", "balthasar", "casper"} <= set(served)


def test_compose_environment_is_real_settings(compose: dict[str, Any], clean_env: pytest.MonkeyPatch) -> None:
    for name, spec in _magi_services(compose).items():
        _check_values(clean_env, _environment(spec), name)


@pytest.mark.parametrize("name", sorted(FOREIGN_ENV))
def test_foreign_variables_are_read_by_their_library(name: str) -> None:
    assert name in inspect.getsource(FOREIGN_ENV[name])


def test_compose_gateways_get_secrets_and_the_same_redis(compose: dict[str, Any]) -> None:
    services = _services(compose)
    redis_password = services["redis"]["environment"]["REDIS_PASSWORD"]
    for name, spec in _magi_services(compose).items():
        env = spec["environment"]
        assert env["REDIS_HOST"] == "redis", name
        assert env["REDIS_PASSWORD"] == redis_password, name
        assert int(env["REDIS_PORT"]) == 6379, name
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name, spec in _gateway_services(compose).items():
        env = spec["environment"]
        assert "FIXED_SECRET" in env or "APP_SECRETS" in env, name
        # The secret must be set, not defaulted to something guessable.
        assert ":?" in env.get("FIXED_SECRET", env.get("APP_SECRETS", "")), name


def test_compose_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = _services(compose)["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert re.search(r"--appendfsync (everysec|always)\b", command)
    assert "--maxmemory-policy noeviction" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == "/data"
    assert volume in compose["volumes"]
    assert "healthcheck" in redis


def test_compose_health_checks_use_real_routes(compose: dict[str, Any], routes: set[str]) -> None:
    for name, spec in _gateway_services(compose).items():
        paths = _url_paths(" ".join(spec["healthcheck"]["test"]))
        assert paths == {"/readyz"}, name
        assert paths <= routes
        port = int(_environment(spec)["PORT"])
        assert f"127.0.0.1:{port}/" in " ".join(spec["healthcheck"]["test"])
        assert str(port) in spec["expose"]
    nginx_paths = _url_paths(" ".join(_services(compose)["nginx"]["healthcheck"]["test"]))
    locations = {args[-1] for args, _ in _locations(_nginx())}
    assert nginx_paths
    assert nginx_paths <= locations


def test_compose_only_nginx_publishes_a_port(compose: dict[str, Any]) -> None:
    published = {name for name, spec in _services(compose).items() if spec.get("ports")}
    assert published == {"nginx"}
    mounts = {
        target: source
        for source, target, *_ in (v.split(":") for v in _services(compose)["nginx"]["volumes"])
    }
    assert (DEPLOY / mounts["/etc/nginx/nginx.conf"]).resolve() == NGINX_CONF


def test_compose_grace_periods_cover_the_drain(compose: dict[str, Any]) -> None:
    for name, spec in _gateway_services(compose).items():
        assert _seconds(spec["stop_grace_period"]) >= _drain_budget_s() + 5, name
    for name, spec in _worker_services(compose).items():
        assert _seconds(spec["stop_grace_period"]) >= _worker_budget_s() + 5, name


def test_env_example_lists_every_compose_variable() -> None:
    variables = _interpolated_names(COMPOSE_FILE.read_text(encoding="utf-8"))
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    assert variables <= listed
    assert {"FIXED_SECRET", "REDIS_PASSWORD"} <= set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))


# -- nginx ------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None


def _tokens(text: str) -> Iterator[str]:
    for match in re.finditer(r"#[^\n]*|'[^']*'|\"[^\"]*\"|[{};]|[^\s{};'\"#]+", text):
        token = match.group(0)
        if not token.startswith("#"):
            yield token


def _parse_nginx(text: str) -> list[Directive]:
    """nginx.conf as a tree; unbalanced braces or a missing ``;`` fail the test."""
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for token in _tokens(text):
        if token == ";":
            assert words, "empty directive"
            stack[-1].append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            assert words, "block without a name"
            block: list[Directive] = []
            stack[-1].append(Directive(words[0], words[1:], block))
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"missing ';' after {words}"
            assert len(stack) > 1, "unbalanced '}'"
            stack.pop()
        else:
            words.append(token.strip("'\""))
    assert not words, f"missing ';' after {words}"
    assert len(stack) == 1, "unbalanced '{'"
    return stack[0]


def _nginx() -> list[Directive]:
    return _parse_nginx(NGINX_CONF.read_text(encoding="utf-8"))


def _children(block: list[Directive], name: str) -> list[Directive]:
    return [d for d in block if d.name == name]


def _one(block: list[Directive], name: str) -> Directive:
    found = _children(block, name)
    assert len(found) == 1, f"{len(found)} {name!r}"
    return found[0]


def _http(config: list[Directive]) -> list[Directive]:
    http = _one(config, "http").block
    assert http is not None
    return http


def _servers(config: list[Directive]) -> list[list[Directive]]:
    return [s.block for s in _children(_http(config), "server") if s.block is not None]


def _locations(config: list[Directive]) -> list[tuple[list[str], list[Directive]]]:
    return [
        (location.args, location.block)
        for server in _servers(config)
        for location in _children(server, "location")
        if location.block is not None
    ]


def _effective(levels: list[list[Directive]], name: str) -> list[Directive]:
    """nginx inheritance: the innermost level that sets ``name`` at all wins, whole."""
    for level in reversed(levels):
        found = _children(level, name)
        if found:
            return found
    return []


def _location_levels(config: list[Directive], path: str) -> list[list[Directive]]:
    for server in _servers(config):
        for location in _children(server, "location"):
            if location.args[-1] == path and location.block is not None:
                return [_http(config), server, location.block]
    raise AssertionError(f"no location {path}")


def test_nginx_conf_parses_and_has_events() -> None:
    config = _nginx()
    assert _one(config, "events").block is not None
    assert len(_servers(config)) == 1


def test_nginx_upstreams_are_the_compose_gateways(compose: dict[str, Any]) -> None:
    upstream = _one(_http(_nginx()), "upstream")
    assert upstream.block is not None
    servers = {tuple(d.args[0].split(":")) for d in _children(upstream.block, "server")}
    expected = {(name, _environment(spec)["PORT"]) for name, spec in _gateway_services(compose).items()}
    assert servers == expected
    # WebSockets are long-lived: balance connections; `resolve` follows recreated containers.
    assert _children(upstream.block, "least_conn")
    assert all("resolve" in d.args for d in _children(upstream.block, "server"))
    assert _children(upstream.block, "zone")
    assert _children(_http(_nginx()), "resolver")


def test_nginx_proxies_websockets(compose: dict[str, Any], routes: set[str]) -> None:
    config = _nginx()
    assert "/ws" in routes
    levels = _location_levels(config, "/ws")
    upstream = _one(_http(config), "upstream").args[0]
    assert _effective(levels, "proxy_pass")[0].args == [f"http://{upstream}"]
    assert _effective(levels, "proxy_http_version")[0].args == ["1.1"]
    headers = {d.args[0].lower(): d.args[1] for d in _effective(levels, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    connection_map = next(
        d for d in _children(_http(config), "map") if d.args == ["$http_upgrade", headers["connection"]]
    )
    assert connection_map.block is not None
    assert _one(connection_map.block, "default").args == ["upgrade"]
    # The gateways trust X-Forwarded-For from nginx alone (its fixed address on the network
    # it shares with them only), and nginx replaces, not extends, what the client sent, or
    # the auth-failure throttle would be bypassed.
    nginx = _services(compose)["nginx"]
    (edge,) = nginx["networks"]
    address = _interpolate(nginx["networks"][edge]["ipv4_address"])
    subnet = _interpolate(compose["networks"][edge]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    for name, spec in _services(compose).items():
        networks = spec.get("networks", [])
        assert (edge in networks) == (name == "nginx" or name in _gateway_services(compose)), name
    for spec in _gateway_services(compose).values():
        assert _environment(spec)["FORWARDED_ALLOW_IPS"] == address
    assert headers["x-forwarded-for"] == "$remote_addr"
    assert headers["host"] == "$host"
    ping_interval = inspect.signature(uvicorn.Config).parameters["ws_ping_interval"].default
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        value = _effective(levels, timeout)[0].args[0]
        assert _seconds(value) >= 600 > 10 * ping_interval, timeout
    assert _effective(levels, "proxy_buffering")[0].args == ["off"]


def test_nginx_serves_the_http_api_streams_unbuffered(routes: set[str]) -> None:
    config = _nginx()
    assert {"/v1/judgements", "/v1/sessions/{session_id}/events"} <= routes
    levels = _location_levels(config, "/v1/")
    upstream = _one(_http(config), "upstream").args[0]
    assert _effective(levels, "proxy_pass")[0].args == [f"http://{upstream}"]
    assert _effective(levels, "proxy_http_version")[0].args == ["1.1"]
    assert _effective(levels, "proxy_buffering")[0].args == ["off"]
    assert _effective(levels, "gzip")[0].args == ["off"]
    # An idle stream gets a keepalive every SSE_KEEPALIVE_S: nginx must wait far longer.
    keepalive = Settings.model_fields["sse_keepalive_s"].default
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(_effective(levels, timeout)[0].args[0]) >= 10 * keepalive, timeout


def test_nginx_locations_are_real_routes(routes: set[str]) -> None:
    config = _nginx()
    for args, block in _locations(config):
        path = args[-1]
        if _children(block, "proxy_pass"):
            # An exact route, or a prefix location (``/v1/``) that real routes are under.
            under = path.endswith("/") and any(route.startswith(path) for route in routes)
            assert path in routes or path == "/" or under, path
    assert _location_levels(config, "/healthz")
    assert _location_levels(config, "/readyz")
    # /metrics stays inside: the location exists and does not proxy.
    metrics = _location_levels(config, "/metrics")[-1]
    assert not _children(metrics, "proxy_pass")
    assert _children(metrics, "return") or _children(metrics, "deny")


def _nginx_binary() -> str | None:
    return os.environ.get("MAGI_TEST_NGINX") or shutil.which("nginx")


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = _nginx_binary()
    if nginx is None:
        pytest.skip("no nginx here (the structural tests cover the file)")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30, check=False).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert found, version
    text = NGINX_CONF.read_text(encoding="utf-8")
    # The compose names do not resolve here; `resolve` needs nginx >= 1.27.3.
    resolve = "" if tuple(map(int, found.groups())) < (1, 27, 3) else " resolve"
    text = re.sub(r"server [\w.-]+:(\d+) resolve", rf"server 127.0.0.1:\1{resolve}", text)
    text = text.replace("/var/log/nginx", str(tmp_path))
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {tmp_path}/{kind};" for kind in kinds)
    text = text.replace("http {", "http {\n" + temp, 1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr", "-g", f"pid {tmp_path}/pid;"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# -- Dockerfile -------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_builds_the_package_and_runs_the_gateway_unprivileged() -> None:
    instructions = _dockerfile()
    stages = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert stages
    assert set(stages) == {"python:3.11-slim"}
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0].isdigit(), "numeric, for runAsNonRoot"
    cmd = json.loads(next(rest for keyword, rest in reversed(final) if keyword == "CMD"))
    assert cmd == ["magi-gateway", "serve"]
    _cli_params(cmd)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["magi-gateway"] == "magi_gateway.cli:main"
    exposed = [rest for keyword, rest in final if keyword == "EXPOSE"]
    assert exposed == [str(Settings.model_fields["port"].default)]
    assert any(
        keyword == "RUN" and "pip install" in rest and "magi-gateway" in rest for keyword, rest in final
    )


def test_dockerfile_copies_only_what_the_build_context_holds() -> None:
    """``.dockerignore`` is an allow-list; every COPY source exists and is on it."""
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [rest.split() for keyword, rest in _dockerfile() if keyword == "COPY"]
    sources = [src for args in copies if not args[0].startswith("--from") for src in args[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, source
    # What hatchling needs to build the wheel.
    assert {"pyproject.toml", "README.md", "src"} <= allowed


# -- Kubernetes -------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [d for path in _manifest_files() for d in _documents(path)]


def _of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _of_kind(objects, "Deployment", "StatefulSet")


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _magi_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in _workloads(objects):
        for container in _containers(workload):
            if container["image"].split(":")[0].endswith("magi-gateway"):
                yield workload, container


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in _workloads(objects) if _selects(selector, _pod_labels(w))]


def _role(container: dict[str, Any]) -> str:
    return _cli_params(container["command"])[0]


@pytest.mark.parametrize(
    ("path", "index"),
    [(p, i) for p in _manifest_files() for i in range(len(_documents(p)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_k8s_manifest_matches_kubernetes_schema(path: Path, index: int) -> None:
    document = _documents(path)[index]
    for version in K8S_VERSIONS:
        validate_k8s(document, version, strict=True)


def test_k8s_objects_have_identity_and_labels(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    expected = {"Deployment", "Service", "StatefulSet", "Ingress", "Secret", "ConfigMap"}
    assert expected | {"PodDisruptionBudget", "HorizontalPodAutoscaler", "Namespace"} <= kinds
    seen = set()
    for o in objects:
        assert o["apiVersion"]
        assert o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "magi"
        key = (o["kind"], o["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)


def test_k8s_selectors_match_pod_labels(objects: list[dict[str, Any]]) -> None:
    for workload in _workloads(objects):
        assert _selects(workload["spec"]["selector"]["matchLabels"], _pod_labels(workload))
        for other in _workloads(objects):
            if other is not workload:
                assert not _selects(workload["spec"]["selector"]["matchLabels"], _pod_labels(other))
    for service in _of_kind(objects, "Service"):
        (workload,) = _selected(objects, service["spec"]["selector"])
        port_names = {p.get("name") for c in _containers(workload) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]
    for budget in _of_kind(objects, "PodDisruptionBudget"):
        (workload,) = _selected(objects, budget["spec"]["selector"]["matchLabels"])
        assert budget.get("spec", {}).get("minAvailable", 0) < workload["spec"]["replicas"]
    for scaler in _of_kind(objects, "HorizontalPodAutoscaler"):
        target = scaler["spec"]["scaleTargetRef"]
        workload = _named(objects, target["kind"], target["name"])
        assert scaler["spec"]["minReplicas"] >= 2
        assert scaler["spec"]["minReplicas"] <= workload["spec"]["replicas"] <= scaler["spec"]["maxReplicas"]
    for stateful in _of_kind(objects, "StatefulSet"):
        headless = _named(objects, "Service", stateful["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert _selects(headless["spec"]["selector"], _pod_labels(stateful))


def test_k8s_volumes_and_references_resolve(objects: list[dict[str, Any]]) -> None:
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
            for source in container.get("envFrom", []):
                _named(objects, "ConfigMap", source["configMapRef"]["name"])
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = _named(objects, "Secret", ref["name"])
                    assert ref["key"] in secret["stringData"], ref


def test_k8s_environment_is_real_settings(
    objects: list[dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    secret_values = {
        key: value for secret in _of_kind(objects, "Secret") for key, value in secret["stringData"].items()
    }
    for workload, container in _magi_containers(objects):
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(_named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                env[var["name"]] = secret_values[var["valueFrom"]["secretKeyRef"]["key"]]
        _check_values(clean_env, env, f"{workload['metadata']['name']}/{container['name']}")
        assert "REDIS_PASSWORD" in env
        if _role(container) == "serve":
            assert "FIXED_SECRET" in env or "APP_SECRETS" in env
            # The gateways trust X-Forwarded-For from the ingress controller: in-cluster
            # peers, never anyone.
            assert env["FORWARDED_ALLOW_IPS"]
            trusted = [ipaddress.ip_network(n.strip()) for n in env["FORWARDED_ALLOW_IPS"].split(",")]
            assert all(network.is_private for network in trusted), trusted
    assert set(_named(objects, "Secret", "magi-secrets")["stringData"]) <= KNOWN_ENV


def test_k8s_commands_parse_and_workers_serve_separate_agents(objects: list[dict[str, Any]]) -> None:
    roles: dict[str, list[str]] = {}
    served: dict[str, str] = {}
    for workload, container in _magi_containers(objects):
        roles.setdefault(_role(container), []).append(workload["metadata"]["name"])
        if _role(container) == "agent":
            for agent_id in _agents_of(container["command"]):
                assert agent_id not in served, agent_id
                served[agent_id] = workload["metadata"]["name"]
    assert len(roles["serve"]) == 1
    assert len(roles["agent"]) >= 2
    assert {"melchior", "balthasar", "casper"} <= set(served)


def _gateway(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(w, c) for w, c in _magi_containers(objects) if _role(c) == "serve"]
    return found


def test_k8s_gateway_probes_use_real_routes(objects: list[dict[str, Any]], routes: set[str]) -> None:
    workload, container = _gateway(objects)
    assert workload["spec"]["replicas"] == 2
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert ports["http"] == int(env["PORT"])
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    # Liveness must not depend on Redis, or a Redis outage restarts every gateway.
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz")
    assert {readiness["path"], liveness["path"]} <= routes
    assert readiness["port"] in ports
    assert liveness["port"] in ports
    # /readyz waits up to a second for its notification loopback.
    assert container["readinessProbe"]["timeoutSeconds"] > 1
    strategy = workload["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_k8s_grace_periods_cover_the_drain(objects: list[dict[str, Any]]) -> None:
    for workload, container in _magi_containers(objects):
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if _role(container) == "serve":
            pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop[0] == "sleep"
            assert grace >= float(pre_stop[1]) + _drain_budget_s() + 5
        else:
            assert grace >= _worker_budget_s() + 5


def test_k8s_redis_persists_with_aof(objects: list[dict[str, Any]]) -> None:
    (redis,) = _of_kind(objects, "StatefulSet")
    (container,) = _containers(redis)
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert re.search(r"--appendfsync (everysec|always)\b", args)
    assert "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    assert "REDIS_PASSWORD" in {v["name"] for v in container["env"]}
    (template,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[template["metadata"]["name"]] == "/data"
    config = _named(objects, "ConfigMap", "magi-config")["data"]
    service = _named(objects, "Service", config["REDIS_HOST"])
    assert _selects(service["spec"]["selector"], _pod_labels(redis))
    assert int(config["REDIS_PORT"]) in {p["port"] for p in service["spec"]["ports"]}


def test_k8s_ingress_routes_websockets_to_the_gateway(
    objects: list[dict[str, Any]], routes: set[str]
) -> None:
    (ingress,) = _of_kind(objects, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    for key in (
        "nginx.ingress.kubernetes.io/proxy-read-timeout",
        "nginx.ingress.kubernetes.io/proxy-send-timeout",
    ):
        assert _seconds(int(annotations[key])) >= 600
    for key in ("nginx.org/proxy-read-timeout", "nginx.org/proxy-send-timeout"):
        assert _seconds(annotations[key]) >= 600
    gateway_service = annotations["nginx.org/websocket-services"]
    paths = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = _named(objects, "Service", backend["name"])
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
            paths[path["path"]] = (path["pathType"], backend["name"])
            prefix = path["path"] + ("/" if path["pathType"] == "Prefix" else "")
            under = path["pathType"] == "Prefix" and any(route.startswith(prefix) for route in routes)
            assert prefix in routes or under, path["path"]
    assert paths["/ws"] == ("Exact", gateway_service)
    # The HTTP API, its event streams unbuffered.
    assert paths["/v1"] == ("Prefix", gateway_service)
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.org/proxy-buffering"] == "False"
    assert "/metrics" not in paths
    workload, _ = _gateway(objects)
    assert _selected(objects, _named(objects, "Service", gateway_service)["spec"]["selector"]) == [workload]


def test_kustomization_applies_every_manifest_but_the_secret_example(objects: list[dict[str, Any]]) -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in _manifest_files() if p.name != SECRET_EXAMPLE)
    (namespace,) = _of_kind(objects, "Namespace")
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    images = {image["name"] for image in kustomization["images"]}
    assert {c["image"].split(":")[0] for _, c in _magi_containers(objects)} <= images
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    applied = [o for path in listed for o in _documents(K8S / path)]
    assert len(rendered) == len(applied)
    assert all(
        d["metadata"].get("namespace") == namespace["metadata"]["name"]
        for d in rendered
        if d["kind"] != "Namespace"
    )


# -- docs -------------------------------------------------------------------------------


def test_deploy_doc_explains_every_variable(compose: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    names = {name for spec in _magi_services(compose).values() for name in spec.get("environment", {})}
    names |= _interpolated_names(COMPOSE_FILE.read_text(encoding="utf-8"))
    for _, container in _magi_containers(objects):
        names |= {v["name"] for v in container.get("env", [])}
    for config_map in _of_kind(objects, "ConfigMap"):
        names |= set(config_map["data"])
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in doc)
    assert not missing


#: Figures the sizing guide quotes; BENCHMARKS.md must still say them.
QUOTED_BENCHMARKS = (
    "6,601",
    "108 µs",
    "166 µs",
    "96 µs",
    "180 µs",
    "48 µs",
    "79 µs",
    "33.9 KiB",
    "774",
    "1,232 µs",
    "4,807",
)


@pytest.mark.parametrize("figure", QUOTED_BENCHMARKS)
def test_sizing_guide_quotes_current_benchmarks(figure: str) -> None:
    assert figure in (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert figure in DEPLOY_DOC.read_text(encoding="utf-8")
