"""Rendering a judgement in the terminal with rich: one live panel per agent, then the verdict."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

__all__ = ["render_judgement"]

_DECISION_STYLE = {"approve": "bold green", "reject": "bold red", "abstain": "bold yellow"}
_MAX_LINES = 8


class _AgentView:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.lines: list[str] = []
        self.final: dict[str, Any] | None = None

    def panel(self, width: int) -> Panel:
        body = Text()
        for line in self.lines[-_MAX_LINES:]:
            body.append(line + "\n", style="dim")
        border = "cyan"
        if self.final is not None:
            data = self.final.get("data", {})
            decision = data.get("decision")
            if self.final.get("result_code") == 0:
                body.append(str(data.get("judgement", "")) + "\n")
            else:
                body.append(f"error {self.final.get('result_code')}: {data.get('error', '')}\n", style="red")
            if decision:
                body.append(decision.upper(), style=_DECISION_STYLE.get(decision, "bold"))
                border = _DECISION_STYLE.get(decision, "white").split()[-1]
        else:
            body.append("thinking…", style="italic cyan")
        return Panel(body, title=self.agent_id.upper(), border_style=border, width=width)


async def render_judgement(
    console: Console, agent_ids: Sequence[str], messages: AsyncIterator[dict[str, Any]]
) -> dict[str, Any] | None:
    """Show ``messages`` of one session live; return the complete message."""
    views = {a: _AgentView(a) for a in agent_ids}
    complete: dict[str, Any] | None = None

    def frame() -> Group:
        width = max(24, min(44, console.width // max(len(views), 1) - 1))
        parts: list[Any] = [Columns([v.panel(width) for v in views.values()])]
        if complete is not None:
            verdict = complete["data"]["verdict"]
            parts.append(Text(f"VERDICT: {verdict.upper()}", style=_DECISION_STYLE.get(verdict, "bold")))
        return Group(*parts)

    with Live(frame(), console=console, refresh_per_second=12, transient=False) as live:
        async for message in messages:
            kind = message.get("type")
            view = views.get(message.get("agent_id", ""))
            if kind == "agent_judgement_stream" and view is not None:
                view.lines.append(str(message["data"].get("thinking", "")))
            elif kind == "agent_judgement_final" and view is not None:
                view.final = message
            elif kind == "agent_judgement_complete":
                complete = message
            live.update(frame())
    return complete
