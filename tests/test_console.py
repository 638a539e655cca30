"""The browser console (``GET /``), end to end in headless Chromium.

Debian's ``chromium`` is driven by Playwright (``executable_path``; Playwright's own
browser downloads are never used) against a live in-process gateway and a worker
running the demo agents. When Chromium or Playwright is missing the tests are skipped
locally and fail in CI (``CI`` set), where ``.ci/run`` installs Chromium.

Screenshots of every state are taken on each run; they go to ``MAGI_SCREENSHOT_DIR``
when set (``MAGI_SCREENSHOT_DIR=docs pytest tests/test_console.py`` refreshes the ones
the README shows), else to the test's temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from magi_gateway.agents import demo_agents
from magi_gateway.cli.admin import send_command
from magi_gateway.core.errors import CLOSE_TRY_AGAIN_LATER
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker

from ._delivery_helpers import Gated
from ._support import APPID, SECRET, GatewayHandle, make_token

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

StartWorker = Callable[..., Awaitable[Worker]]
StartGateway = Callable[[Settings], Awaitable[GatewayHandle]]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}
QUESTION = "Should we deploy the untested weapon?"
TRIO = ["melchior", "balthasar", "casper"]
#: Messages of a demo session over the trio: accepted, 5 thinking chunks and a final per
#: agent, complete.
TRIO_MESSAGES = 1 + 3 * 5 + 3 + 1
WAIT_MS = 15_000


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: the browser console tests must run in CI", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    path = os.environ.get("MAGI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("Chromium is not installed (Debian: apt-get install chromium)")
    return path


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go."""
    target = os.environ.get("MAGI_SCREENSHOT_DIR")
    directory = Path(target) if target else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


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


class Console:
    """The console page, with the steps and reads the tests share."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        #: JavaScript errors and console errors (CSP violations included).
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    async def open(self, gateway: GatewayHandle) -> None:
        await self.page.goto(f"{gateway.http}/")
        await expect(self.page.locator("#status")).to_have_attribute("data-state", "disconnected")

    async def connect(self, secret: str | None = SECRET, appid: str = APPID) -> None:
        """Fill the link form and connect (``secret=None``: a debug token)."""
        await self.page.fill("#appid", appid)
        if secret is None:
            await self.page.check("input[name=mode][value=debug]")
        else:
            await self.page.fill("#secret", secret)
        await self.page.click("#connect")

    async def expect_state(self, state: str) -> None:
        await expect(self.page.locator("#status")).to_have_attribute("data-state", state, timeout=WAIT_MS)

    async def submit(self, question: str = QUESTION, agents: list[str] = TRIO) -> None:
        agent_list = self.page.locator("#agent-list input[type=checkbox]")
        await expect(agent_list).to_have_count(len(agents), timeout=WAIT_MS)
        for agent_id in agents:
            await expect(self.page.locator(f"#agent-list input[value={agent_id}]")).to_be_checked()
        await self.page.fill("#question", question)
        await self.page.click("#submit")

    async def wait_for(self, script: str, arg: Any = None) -> None:
        await self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS)

    async def wait_for_verdict(self, verdict: str) -> None:
        await expect(self.page.locator("#verdict")).to_have_attribute(
            "data-verdict", verdict, timeout=WAIT_MS
        )

    async def seqs(self) -> list[int]:
        """The seqs the page applied, in the order it applied them."""
        raw = await self.page.get_attribute("#session", "data-seqs") or ""
        return [int(seq) for seq in raw.split()]

    async def panels(self) -> dict[str, dict[str, Any]]:
        """What each panel shows, by agent id (seq numbers left out: they depend on timing)."""
        result: dict[str, dict[str, Any]] = await self.page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('.panel')].map((p) => [
                p.dataset.agentId,
                {
                    name: p.querySelector('.panel-name').textContent,
                    state: p.dataset.state,
                    decision: p.dataset.decision,
                    resultCode: p.dataset.resultCode,
                    lines: [...p.querySelectorAll('.panel-log .text')].map((t) => t.textContent),
                    badge: p.querySelector('.badge').textContent,
                    final: p.querySelector('.final-text').textContent,
                },
            ]))"""
        )
        return result

    async def shot(self, name: str, *, full_page: bool = False) -> None:
        await self.page.screenshot(
            path=str(self.shots / f"console-{name}.png"), full_page=full_page, animations="disabled"
        )


@pytest.fixture
async def console(browser: Browser, shots: Path) -> AsyncIterator[Console]:
    """A fresh page; it must not log a JavaScript error."""
    context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        page = Console(await context.new_page(), shots)
        yield page
    finally:
        await context.close()
    assert page.errors == []


async def _drop_connections(gateway: GatewayHandle) -> None:
    """Close every client connection of the in-process gateway, server side."""
    assert gateway.gateway is not None
    connections = list(gateway.gateway._connections.values())
    assert connections
    for connection in connections:
        connection.request_close(CLOSE_TRY_AGAIN_LATER, "dropped by the test")


async def test_judgement_streams_into_three_panels_then_the_verdict(
    gateway: GatewayHandle, start_worker: StartWorker, console: Console
) -> None:
    await start_worker(demo_agents(delay_s=0.2))
    await console.open(gateway)
    await console.shot("empty")

    await console.connect()
    await console.expect_state("connected")
    await expect(console.page.locator(".panel")).to_have_count(3)
    await console.page.fill("#question", QUESTION)
    await console.shot("connected")

    await console.submit()
    # All three panels stream at once, MAGI style.
    await console.wait_for(
        "() => [...document.querySelectorAll('.panel')].every((p) => Number(p.dataset.chunks) >= 2)"
    )
    await console.shot("streaming")
    panels = await console.panels()
    assert [panels[a]["name"] for a in TRIO] == ["MELCHIOR-1", "BALTHASAR-2", "CASPER-3"]

    await console.wait_for_verdict("reject")
    await console.shot("verdict")
    assert await console.page.text_content("#verdict-text") == "reject"
    panels = await console.panels()
    assert {a: panels[a]["decision"] for a in TRIO} == {
        "melchior": "reject",
        "balthasar": "reject",
        "casper": "approve",
    }
    assert all(p["state"] == "decided" and p["resultCode"] == "0" for p in panels.values())
    assert panels["melchior"]["final"] == "MELCHIOR-1 rejects: the request mentions untested."
    assert panels["balthasar"]["final"] == "BALTHASAR-2 rejects: the request mentions weapon."
    assert panels["casper"]["badge"] == "approve"
    assert panels["melchior"]["lines"] == [
        "MELCHIOR-1 (the scientist) is reading the request.",
        "Separating claims from evidence.",
        "Checking for anything unproven or untested.",
        "Weighing the expected outcome.",
        "MELCHIOR-1: decision reached.",
    ]
    assert await console.seqs() == list(range(1, TRIO_MESSAGES + 1))

    # The same page on a phone: panels stack, nothing overflows sideways.
    await console.page.set_viewport_size({"width": 420, "height": 900})
    assert await console.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await console.shot("mobile", full_page=True)


async def test_a_dropped_connection_resumes_with_nothing_missing(
    gateway: GatewayHandle, start_worker: StartWorker, console: Console
) -> None:
    assert gateway.gateway is not None
    await start_worker(demo_agents(delay_s=0.3))
    await console.open(gateway)
    await console.connect()
    await console.expect_state("connected")

    # A run without interruption, to compare with.
    await console.submit()
    await console.wait_for_verdict("reject")
    undisturbed = await console.panels()
    assert await console.seqs() == list(range(1, TRIO_MESSAGES + 1))

    # The same judgement again, dropped twice mid-stream by the gateway.
    await console.submit()
    await console.wait_for("() => document.querySelector('#session').dataset.seqs.split(' ').length >= 4")
    await _drop_connections(gateway)
    await console.wait_for("() => document.querySelector('#session').dataset.reconnects === '1'")
    await console.expect_state("connected")

    gateway.gateway.accepting = False  # new connections are closed (1012) until this is undone
    try:
        await _drop_connections(gateway)
        await console.expect_state("reconnecting")
        await console.wait_for("() => Number(document.querySelector('#status').dataset.attempt) >= 2")
        assert await console.page.text_content("#status-text") == (
            f"Reconnecting (attempt {await console.page.get_attribute('#status', 'data-attempt')})"
        )
        await console.shot("reconnecting")
    finally:
        gateway.gateway.accepting = True

    await console.expect_state("connected")
    await console.wait_for_verdict("reject")
    assert await console.panels() == undisturbed
    assert await console.seqs() == list(range(1, TRIO_MESSAGES + 1))
    session = console.page.locator("#session")
    await expect(session).to_have_attribute("data-reconnects", "2")
    await expect(session).to_have_attribute("data-complete", "true")
    history = (await console.page.get_attribute("#status", "data-history") or "").split()
    assert history[:3] == ["disconnected", "connecting", "connected"]
    assert history.count("reconnecting") == 2
    assert history[-1] == "connected"


async def test_two_tabs_on_one_session_show_the_same_panels(
    gateway: GatewayHandle, start_worker: StartWorker, console: Console, shots: Path
) -> None:
    """The session's address opened in a second tab follows it too; the first tab keeps it."""
    gated = Gated("melchior", before=2, after=3)  # holds the session open while tab two joins
    await start_worker([gated.agent, *(a for a in demo_agents(delay_s=0.05) if a.agent_id != "melchior")])
    first = console
    await first.open(gateway)
    await first.connect()
    await first.expect_state("connected")
    await first.submit()
    melchior = "document.querySelector('.panel[data-agent-id=melchior]')"
    before_gate = f"() => Number({melchior}?.dataset.chunks) >= 2"
    await first.wait_for(before_gate)
    session_id = await first.page.get_attribute("#session", "data-session-id")
    assert session_id
    assert first.page.url.endswith(f"#session={session_id}")  # the address to open elsewhere

    second = Console(await first.page.context.new_page(), shots)
    try:
        await second.page.goto(first.page.url)
        await second.connect()
        await second.expect_state("connected")
        await second.wait_for(before_gate)  # replayed from seq 1: the same panels, built from it
        assert await second.page.get_attribute("#session", "data-session-id") == session_id
        gated.gate.set()
        for tab in (first, second):
            await tab.wait_for_verdict("approve")
        await second.shot("second-tab")
        panels = await first.panels()
        assert await second.panels() == panels
        assert [panels[a]["name"] for a in TRIO] == ["MELCHIOR-1", "BALTHASAR-2", "CASPER-3"]
        lines = [f"before {i}" for i in range(2)] + [f"after {i}" for i in range(3)]
        assert panels["melchior"]["lines"] == lines
        assert all(p["state"] == "decided" for p in panels.values())
        seqs = await first.seqs()
        assert seqs == list(range(1, TRIO_MESSAGES + 1))  # nothing taken from the first tab
        assert await second.seqs() == seqs
        for tab in (first, second):
            assert await tab.page.text_content("#verdict-text") == "approve"
            await expect(tab.page.locator("#session")).to_have_attribute("data-duplicates", "0")
    finally:
        await second.page.close()
    assert second.errors == []


async def test_wrong_secret_shows_auth_failed_and_does_not_retry(
    gateway: GatewayHandle, console: Console
) -> None:
    await console.open(gateway)
    await console.connect(secret="not-the-secret")
    await console.expect_state("auth_failed")
    notice = console.page.locator(".notice[data-code=auth_failed]")
    await expect(notice).to_contain_text("Authentication failed")
    await expect(console.page.locator("#status-text")).to_have_text("Auth failed")
    await console.shot("auth-failed")
    await console.page.wait_for_timeout(600)  # a reconnect would have started by now
    assert (
        await console.page.get_attribute("#status", "data-history") == "disconnected connecting auth_failed"
    )
    assert await console.page.is_enabled("#connect")


async def test_an_operator_broadcast_shows_as_a_notice_and_then_disconnect_app(
    settings: Settings, start_gateway: StartGateway, console: Console
) -> None:
    admin = settings.model_copy(update={"admin_secret": "console-admin"})
    gateway = await start_gateway(admin)
    await console.open(gateway)
    await console.connect()
    await console.expect_state("connected")
    await send_command(admin, "console-admin", "broadcast", {"message": "Maintenance at 18:00"}, 0.5)
    notice = console.page.locator(".notice[data-code=broadcast]")
    await expect(notice).to_contain_text("Operator: Maintenance at 18:00", timeout=WAIT_MS)
    await expect(notice).to_have_class("notice info")
    # Disconnected by the operator (4002): the console reconnects on its own.
    answers = await send_command(admin, "console-admin", "disconnect-app", {"appid": APPID}, 0.5)
    assert sum(a["connections"] for a in answers) == 1
    await console.wait_for("document.querySelector('#status').dataset.history.includes('reconnecting')")
    await console.expect_state("connected")
    assert console.errors == []


async def test_debug_token_connects_and_cancel_stops_the_agents(
    gateway: GatewayHandle, start_worker: StartWorker, console: Console
) -> None:
    await start_worker(demo_agents(delay_s=0.5))
    await console.open(gateway)
    await console.connect(secret=None)
    await console.expect_state("connected")
    await expect(console.page.locator("#secret-field")).to_be_hidden()

    await console.submit("Shall we have tea?")
    await console.wait_for(
        "() => [...document.querySelectorAll('.panel')].every((p) => Number(p.dataset.chunks) >= 1)"
    )
    await expect(console.page.locator("#cancel")).to_be_enabled()
    await console.page.click("#cancel")
    await console.wait_for_verdict("abstain")
    await console.shot("cancelled")
    panels = await console.panels()
    assert {a: (p["state"], p["resultCode"]) for a, p in panels.items()} == {
        a: ("cancelled", "4") for a in TRIO
    }
    assert all(p["final"] == "Cancelled by the client" for p in panels.values())
    assert await console.page.text_content("#verdict-detail") == "3 cancelled"
    assert await console.page.is_enabled("#submit")
    # The appid (never the secret) is remembered for the next visit.
    stored = await console.page.evaluate("localStorage.getItem('magi-console')")
    assert stored == '{"appid":"test-app","mode":"debug"}'


async def test_debug_token_mode_without_debug_says_so(
    settings: Settings, start_gateway: StartGateway, console: Console
) -> None:
    gateway = await start_gateway(settings.model_copy(update={"debug": False}))
    await console.open(gateway)
    await console.connect(secret=None)
    await console.expect_state("auth_failed")
    await expect(console.page.locator(".notice")).to_contain_text("DEBUG is off")
    # The refused POST /v1/token is logged by the browser: that one error is expected.
    assert all("/v1/token" in e or "status of 40" in e for e in console.errors)
    console.errors.clear()


async def test_token_matches_the_gateway_scheme(gateway: GatewayHandle, console: Console) -> None:
    """Web Crypto, and the plain-JS fallback for insecure contexts, both match hashlib."""
    await console.open(gateway)
    samples = ["", "abc", "x" * 55, "y" * 56, "z" * 64, "w" * 119, "appid-ü-秘密-1234", "q" * 1000]
    digests = await console.page.evaluate(
        """async (samples) => {
            const token = await import('/static/token.js');
            const bytes = (s) => new TextEncoder().encode(s);
            return Promise.all(samples.map(async (s) => [
                await token.sha256Hex(s), token.sha256HexFallback(bytes(s))]));
        }""",
        samples,
    )
    expected = [hashlib.sha256(s.encode()).hexdigest() for s in samples]
    assert [web for web, _ in digests] == expected
    assert [fallback for _, fallback in digests] == expected
    minute_ms = 29_000_000 * 60_000 + 59_999
    token = await console.page.evaluate(
        "async ([appid, secret, ms]) => (await import('/static/token.js')).seedToken(appid, secret, ms)",
        [APPID, SECRET, minute_ms],
    )
    assert token == make_token(APPID, SECRET, at=minute_ms / 1000)


async def test_console_assets_are_served_with_a_strict_policy(
    gateway: GatewayHandle, console: Console
) -> None:
    response = await console.page.goto(f"{gateway.http}/")
    assert response is not None
    policy = (await response.all_headers())["content-security-policy"]
    assert "script-src 'self'" in policy
    assert f"connect-src 'self' ws://127.0.0.1:{gateway.port} wss://127.0.0.1:{gateway.port};" in policy
    for asset, kind in [
        ("console.js", "javascript"),
        ("token.js", "javascript"),
        ("console.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        reply = await console.page.request.get(f"{gateway.http}/static/{asset}")
        assert reply.status == 200
        assert kind in reply.headers["content-type"]
        assert reply.headers["cache-control"] == "no-cache"
