"""A page written to the original MAGI frontend's logic reaches a verdict, in headless Chromium.

The page (``tests/original_frontend/index.html``, test data) is served by the gateway under
test (the test mounts its directory on the app), because the frontend connects to ``/ws``
on its own host. It authenticates as the frontend's appid with a token for the development
secret, sends the judgement in the frontend's form (agents by their original UUIDs), and
concludes from the ``agent_response`` frames alone. Chromium is driven as in
``test_console`` (skipped locally when absent, required in CI).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from starlette.staticfiles import StaticFiles

from magi_gateway.agents import demo_agents
from magi_gateway.cli._serving import uvicorn_config
from magi_gateway.server.app import create_app
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._support import GatewayHandle
from .test_console import CHROMIUM_ARGS, _chromium, _unavailable

try:
    from playwright.async_api import Browser, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

PAGE_DIR = Path(__file__).with_name("original_frontend")
DEVELOPMENT_SECRET = "magi-gateway-development-secret"
UUIDS = {
    "d37c1cc8-bcc4-4b73-9f49-a93a30971f2c": "MELCHIOR",
    "6634d0ec-d700-4a92-9066-4960a0f11927": "BALTHASAR",
    "89cbe912-25d0-47b0-97da-b25622bfac0d": "CASPER",
}
WAIT_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless."""
    if async_playwright is None:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    executable = _chromium()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def frontend_gateway(settings: Settings) -> AsyncIterator[GatewayHandle]:
    """A gateway with the development secret that also serves the page at ``/original/``."""
    chosen = settings.model_copy(update={"fixed_secret": DEVELOPMENT_SECRET})
    app = create_app(chosen)
    app.mount("/original", StaticFiles(directory=PAGE_DIR, html=True))
    server = uvicorn.Server(uvicorn_config(app, chosen, "127.0.0.1", 0, "warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield GatewayHandle(port=port, app=app, gateway=app.state.gateway)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("question", "decisions", "verdict"),
    [
        # MELCHIOR minds "untested", BALTHASAR "weapon"; CASPER does not mind either.
        ("Should we deploy the untested weapon?", ["NEGATIVE", "NEGATIVE", "POSITIVE"], "NEGATIVE"),
        ("Shall we have tea?", ["POSITIVE", "POSITIVE", "POSITIVE"], "POSITIVE"),
    ],
)
async def test_the_original_frontend_reaches_a_verdict(
    frontend_gateway: GatewayHandle,
    start_worker: Callable[..., Awaitable[Worker]],
    browser: Browser,
    question: str,
    decisions: list[str],
    verdict: str,
) -> None:
    await start_worker(demo_agents(delay_s=0.05))
    context = await browser.new_context()
    errors: list[str] = []
    try:
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        await page.goto(f"{frontend_gateway.http}/original/?q={quote(question)}")
        await expect(page.locator("body")).to_have_attribute("data-verdict", verdict, timeout=WAIT_MS)
        shown = await page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('.agent')].map(
                (a) => [a.dataset.agentId, {decision: a.dataset.decision, text: a.textContent}]))"""
        )
        log = await page.locator("#log").text_content() or ""
    finally:
        await context.close()
    assert errors == []
    assert {agent_id: seen["decision"] for agent_id, seen in shown.items()} == dict(
        zip(UUIDS, decisions, strict=True)
    )
    for agent_id, seen in shown.items():
        name = UUIDS[agent_id]
        assert seen["text"].startswith(f"{name}: ")
        assert "is reading the request." in seen["text"]  # the streamed thinking, concatenated
        assert f"<decision>{seen['decision']}</decision>" in seen["text"]
    # Everything that is not an agent_response the page only logs: the acknowledgement,
    # the greeting and the session's end.
    assert '"type":"message_received","message_type":"agent_judgement"' in log
    assert '"type":"agent_judgement_complete"' in log
