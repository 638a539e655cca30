"""The ``magi-gateway`` command line: up, serve, agent, ask, token, bench."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from magi_gateway.agents import DEMO_AGENT_NAMES, BenchAgent, demo_agents
from magi_gateway.agents.config import AgentsConfigError, import_agents, load_agents_file, make_llm_agent
from magi_gateway.bench.commands import app as bench_app
from magi_gateway.cli._serving import Server, run_until_signal, serve_until_signal, uvicorn_config
from magi_gateway.cli._terminal import render_judgement
from magi_gateway.cli.admin import app as admin_app
from magi_gateway.client import MagiClient
from magi_gateway.core.auth import compute_token, minute_of
from magi_gateway.core.jwt_auth import mint
from magi_gateway.embedded import RedisServer, free_port
from magi_gateway.http_client import MagiHttpClient, http_base_url
from magi_gateway.logs import configure_logging
from magi_gateway.settings import Settings, comma_list
from magi_gateway.worker.legacy import LegacyBridge
from magi_gateway.worker.pubsub_bridge import PubSubBridge
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent

__all__ = ["app", "main"]

app = typer.Typer(
    help="Magi Gateway: WebSocket access to AI agents over Redis.",
    no_args_is_help=True,
    # Plain help text: "[env HOST]" hints must not be read as rich markup and vanish.
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")
app.add_typer(admin_app, name="admin")
console = Console()

DEFAULT_DATA_DIR = Path(".magi")
DEMO_QUESTION = "Should NERV deploy the untested weapon against the Angel?"
_AGENT_HELP = "demo | melchior | balthasar | casper | bench | llm | FILE.toml | module:object"
_REDIS_FIELDS = {"redis_url", "redis_host", "redis_port", "redis_db", "redis_password"}


def _secret(settings: Settings, data_dir: Path, *, create: bool) -> str:
    """FIXED_SECRET, else the secret ``up`` stored in the data dir (made when ``create``)."""
    if settings.fixed_secret:
        return settings.fixed_secret
    path = data_dir / "secret"
    if path.is_file():
        return path.read_text().strip()
    if not create:
        raise typer.BadParameter(
            "No secret: set FIXED_SECRET, pass --secret, or run `magi-gateway up` here first"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(18)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env PORT]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Run the gateway only (Redis and workers run elsewhere)."""
    settings = Settings()
    configure_logging(log_level, settings.log_format)
    from magi_gateway.server.app import create_app

    app = create_app(settings)
    server = Server(uvicorn_config(app, settings, host or settings.host, port or settings.port, log_level))
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(serve_until_signal(server, app.state.gateway))


def load_agents(
    specs: list[str],
    *,
    chunks: int,
    chunk_bytes: int,
    delay_s: float,
    config: Path | None = None,
    name: str | None = None,
    persona: str | None = None,
    model: str | None = None,
    base_url: str | None = None,
) -> list[Agent]:
    """Agents named by ``specs`` (see ``_AGENT_HELP``), then those of the ``config`` file."""
    agents: list[Agent] = []
    demo = {a.name: a for a in demo_agents()}
    try:
        for spec in specs:
            if spec == "demo":
                agents.extend(demo.values())
            elif spec in DEMO_AGENT_NAMES:
                agents.append(demo[spec])
            elif spec == "bench":
                agents.append(BenchAgent(chunks=chunks, chunk_bytes=chunk_bytes, delay_s=delay_s))
            elif spec == "llm":
                if not name:
                    raise typer.BadParameter("agent llm needs --name")
                agents.append(make_llm_agent(name, persona, model=model, base_url=base_url))
            elif spec.endswith(".toml"):
                agents.extend(load_agents_file(spec))
            elif ":" in spec:
                agents.extend(import_agents(spec))
            else:
                raise typer.BadParameter(f"unknown agent {spec!r}: use {_AGENT_HELP.replace(' |', ',')}")
        if config is not None:
            agents.extend(load_agents_file(config))
    except AgentsConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return agents


@app.command()
def agent(
    names: Annotated[list[str] | None, typer.Argument(help=_AGENT_HELP)] = None,
    config: Annotated[Path | None, typer.Option(help="An agents file (agents.toml) to serve")] = None,
    name: Annotated[str | None, typer.Option(help="llm: the agent's name")] = None,
    persona: Annotated[
        str | None, typer.Option(help="llm: scientist | mother | woman | a prompt file")
    ] = None,
    model: Annotated[str | None, typer.Option(help="llm: model (default: env LLM_MODEL)")] = None,
    base_url: Annotated[str | None, typer.Option(help="llm: API root (default: env LLM_BASE_URL)")] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Requests run at once [env WORKER_CONCURRENCY]")
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit once no request is waiting")] = False,
    chunks: Annotated[int, typer.Option(help="bench: chunks per request")] = 50,
    chunk_bytes: Annotated[int, typer.Option("--bytes", help="bench: bytes per chunk")] = 100,
    delay: Annotated[float, typer.Option(help="bench: seconds between chunks")] = 0.0,
) -> None:
    """Run a worker serving the named agents."""
    settings = Settings()
    configure_logging("info", settings.log_format)
    if not names and config is None:
        raise typer.BadParameter(f"name the agents to serve ({_AGENT_HELP}) or give --config FILE")
    agents = load_agents(
        names or [],
        chunks=chunks,
        chunk_bytes=chunk_bytes,
        delay_s=delay,
        config=config,
        name=name,
        persona=persona,
        model=model,
        base_url=base_url,
    )
    worker = Worker(agents, settings, concurrency=concurrency, burst=burst)
    console.print(f"worker {worker.worker_id} serving {', '.join(worker.agents)}", style="dim")
    run_until_signal(worker)


@app.command("legacy-bridge")
def legacy_bridge(
    agents: Annotated[
        str | None, typer.Option(help="Comma-separated legacy agent ids [env LEGACY_AGENTS]")
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit once no request or response is waiting")] = False,
) -> None:
    """Serve agents whose backends speak the original system's Redis lists."""
    settings = Settings()
    configure_logging("info", settings.log_format)
    names = comma_list(agents) if agents else settings.legacy_agent_list
    if not names:
        raise typer.BadParameter("name the legacy agents: --agents a,b or LEGACY_AGENTS")
    bridge = LegacyBridge(names, settings, burst=burst)
    console.print(
        f"legacy bridge {bridge.worker.worker_id} serving {', '.join(sorted(bridge.agent_ids))}", style="dim"
    )
    run_until_signal(bridge)


@app.command("pubsub-bridge")
def pubsub_bridge(
    agents: Annotated[
        str | None, typer.Option(help="Comma-separated agent ids of the backends [env PUBSUB_AGENTS]")
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit once no request is waiting or running")] = False,
) -> None:
    """Serve agents whose backends speak the original system's pub/sub channels."""
    settings = Settings()
    configure_logging("info", settings.log_format)
    names = comma_list(agents) if agents else settings.pubsub_agent_list
    if not names:
        raise typer.BadParameter("name the agents: --agents a,b or PUBSUB_AGENTS")
    bridge = PubSubBridge(names, settings, burst=burst)
    console.print(
        f"pub/sub bridge {bridge.worker.worker_id} serving {', '.join(sorted(bridge.agent_ids))}", style="dim"
    )
    run_until_signal(bridge)


@app.command()
def token(
    appid: Annotated[str, typer.Argument(help="Application id")],
    secret: Annotated[str | None, typer.Option(help="Secret [env FIXED_SECRET]")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where `up` keeps its secret")] = DEFAULT_DATA_DIR,
    jwt: Annotated[bool, typer.Option("--jwt", help="Print a JWT (HS256, sub=APPID) instead")] = False,
    ttl: Annotated[int, typer.Option(help="--jwt: seconds until its exp", min=1)] = 3600,
) -> None:
    """Print a token valid for the current minute, or a JWT valid for --ttl seconds."""
    settings = Settings()
    chosen = secret or settings.app_secrets.get(appid) or _secret(settings, data_dir, create=False)
    if jwt:
        typer.echo(
            mint(
                appid,
                chosen,
                now=time.time(),
                ttl_s=ttl,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )
        )
        return
    typer.echo(compute_token(appid, chosen, minute_of(time.time())))


async def _ask(client: MagiClient | MagiHttpClient, text: str, agent_ids: list[str]) -> str:
    async with client:
        complete = await render_judgement(console, agent_ids, client.judge(text, agent_ids))
    return str(complete["data"]["verdict"]) if complete else "none"


@app.command()
def ask(
    text: Annotated[str, typer.Argument(help="The input the agents judge")],
    url: Annotated[str | None, typer.Option(help="Gateway WebSocket URL")] = None,
    appid: Annotated[
        str | None, typer.Option(help="Application id [default: magi-cli, or a JWT's sub]")
    ] = None,
    secret: Annotated[str | None, typer.Option(help="Secret [env FIXED_SECRET]")] = None,
    agents: Annotated[str, typer.Option(help="Comma-separated agent ids")] = ",".join(DEMO_AGENT_NAMES),
    data_dir: Annotated[Path, typer.Option(help="Where `up` keeps its secret")] = DEFAULT_DATA_DIR,
    token: Annotated[str | None, typer.Option(help="A JWT to connect with, instead of a secret")] = None,
    http: Annotated[
        bool, typer.Option("--http", help="Use the HTTP API (Server-Sent Events) instead of the WebSocket")
    ] = False,
) -> None:
    """Stream a judgement in the terminal."""
    settings = Settings()
    agent_ids = comma_list(agents)
    if token is not None:
        secret = None  # the JWT is the credential (its sub the appid, unless one is given)
    else:
        appid = appid or "magi-cli"
        secret = secret or settings.app_secrets.get(appid) or _secret(settings, data_dir, create=False)
    client: MagiClient | MagiHttpClient
    if http:
        base = http_base_url(url) if url else f"http://127.0.0.1:{settings.port}"
        client = MagiHttpClient(base, appid=appid or "", secret=secret, token=token)
    else:
        target = url or f"ws://127.0.0.1:{settings.port}/ws"
        client = MagiClient(target, appid=appid or "", secret=secret, token=token)
    asyncio.run(_ask(client, text, agent_ids))


async def _up(
    settings: Settings, host: str, port: int, data_dir: Path, demo: bool, agents: list[Agent] | None
) -> None:
    redis_server: RedisServer | None = None
    if not (_REDIS_FIELDS & settings.model_fields_set):
        redis_server = RedisServer(data_dir / "redis", port=free_port())
        await asyncio.to_thread(redis_server.start)
        settings = settings.model_copy(update={"redis_url": redis_server.url})
    secret = _secret(settings, data_dir, create=True)
    settings = settings.model_copy(update={"fixed_secret": secret, "host": host, "port": port})
    from magi_gateway.server.app import create_app

    gateway_app = create_app(settings)
    server = Server(uvicorn_config(gateway_app, settings, host, port, "warning"))
    worker = Worker(agents or demo_agents(), settings)
    agent_ids: list[str] = list(worker.agents)
    worker_task = asyncio.create_task(worker.run(), name="agents")
    server_task = asyncio.create_task(serve_until_signal(server, gateway_app.state.gateway), name="gateway")
    try:
        while not server.started:
            if server_task.done():
                return
            await asyncio.sleep(0.05)
        ws_url = f"ws://127.0.0.1:{port}/ws"
        kind = "agents" if agents else "demo agents"
        console.print(f"[bold]Magi Gateway is up[/bold] (instance with {kind} {', '.join(agent_ids)})")
        console.print(f"  console    http://127.0.0.1:{port}/")
        console.print(f"  websocket  {ws_url}")
        where = f"embedded, data in {data_dir / 'redis'}" if redis_server else "external"
        console.print(f"  redis      {settings.redis_dsn} ({where})", soft_wrap=True)
        console.print(f"  secret     {secret}  (FIXED_SECRET)")
        console.print(f"  token      magi-gateway token my-app --secret {secret}", soft_wrap=True)
        if demo:
            console.print(f"\nA first judgement: [italic]{DEMO_QUESTION}[/italic]")
            await _ask(MagiClient(ws_url, appid="magi-up", secret=secret), DEMO_QUESTION, agent_ids)
        console.print("\nAsk your own (in another terminal):")
        which = f" --agents {','.join(agent_ids)}" if agents else ""
        console.print(
            f'  magi-gateway ask --url {ws_url} --secret {secret}{which} "Shall we have tea?"',
            soft_wrap=True,
        )
        console.print("Press Ctrl-C to stop.", style="dim")
        await server_task
    finally:
        server.should_exit = True
        await asyncio.gather(server_task, return_exceptions=True)
        worker.stop()
        await asyncio.gather(worker_task, return_exceptions=True)
        if redis_server is not None:
            await asyncio.to_thread(redis_server.stop)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(help="Embedded Redis data and the generated secret")
    ] = DEFAULT_DATA_DIR,
    demo: Annotated[bool, typer.Option(help="Run one demo judgement once up")] = True,
    agents_file: Annotated[
        Path | None, typer.Option("--agents", help="Run the agents of this file instead of the demo trio")
    ] = None,
) -> None:
    """Embedded Redis + gateway + demo agents (or those of --agents FILE), in one command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    agents = None
    if agents_file is not None:
        agents = load_agents([], chunks=50, chunk_bytes=100, delay_s=0.0, config=agents_file)
    asyncio.run(_up(Settings(), host, port, data_dir.resolve(), demo, agents))


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
