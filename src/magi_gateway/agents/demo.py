"""The MAGI demo trio — a DEMO: offline, deterministic, no model behind it.

Each of MELCHIOR (the scientist), BALTHASAR (the mother) and CASPER (the woman)
streams a few thinking chunks, then decides by one documented rule:

    reject if the input contains one of the agent's *concern words*, else approve;
    an input with no letters at all gets ``abstain``.

Concern words (whole words, case-insensitive):

* melchior: unproven, untested, unsafe, risky, guess, rumour, rumor
* balthasar: harm, hurt, danger, dangerous, kill, attack, weapon, destroy
* casper: lie, cheat, steal, betray, boring, ugly, forbidden

So "Should we deploy the untested weapon?" gets reject, reject, approve (verdict:
reject) and "Shall we have tea?" gets three approvals.
"""

from __future__ import annotations

import asyncio
import re

from magi_gateway.worker.sdk import Agent, Context, Judgement

__all__ = ["DEMO_AGENT_NAMES", "DemoAgent", "demo_agents"]

_WORD = re.compile(r"[a-z]+")


class DemoAgent(Agent):
    """One MAGI demo persona."""

    def __init__(
        self,
        name: str,
        title: str,
        concerns: frozenset[str],
        lines: tuple[str, ...],
        delay_s: float = 0.15,
    ) -> None:
        self.name = name
        self.title = title
        self.concerns = concerns
        self.lines = lines
        self.delay_s = delay_s

    def decide(self, user_input: str) -> tuple[str, list[str]]:
        """The demo rule: the decision and the concern words that triggered it."""
        words = set(_WORD.findall(user_input.lower()))
        if not words:
            return "abstain", []
        found = sorted(words & self.concerns)
        return ("reject" if found else "approve"), found

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        """Stream the persona's lines, then apply the rule."""
        decision, found = self.decide(user_input)
        for line in self.lines:
            await ctx.think(line.format(title=self.title))
            await asyncio.sleep(self.delay_s)
        if decision == "reject":
            text = f"{self.title} rejects: the request mentions {', '.join(found)}."
        elif decision == "approve":
            text = f"{self.title} approves: nothing in the request troubles me."
        else:
            text = f"{self.title} abstains: there is nothing to judge."
        await ctx.think(f"{self.title}: decision reached.")
        return Judgement(text, decision=decision, extra={"demo": True})


def demo_agents(delay_s: float = 0.15) -> list[DemoAgent]:
    """Fresh instances of MELCHIOR, BALTHASAR and CASPER."""
    return [
        DemoAgent(
            "melchior",
            "MELCHIOR-1",
            frozenset({"unproven", "untested", "unsafe", "risky", "guess", "rumour", "rumor"}),
            (
                "{title} (the scientist) is reading the request.",
                "Separating claims from evidence.",
                "Checking for anything unproven or untested.",
                "Weighing the expected outcome.",
            ),
            delay_s,
        ),
        DemoAgent(
            "balthasar",
            "BALTHASAR-2",
            frozenset({"harm", "hurt", "danger", "dangerous", "kill", "attack", "weapon", "destroy"}),
            (
                "{title} (the mother) is reading the request.",
                "Who could be hurt by this?",
                "Looking for danger to anyone involved.",
                "Considering what a protective parent would do.",
            ),
            delay_s,
        ),
        DemoAgent(
            "casper",
            "CASPER-3",
            frozenset({"lie", "cheat", "steal", "betray", "boring", "ugly", "forbidden"}),
            (
                "{title} (the woman) is reading the request.",
                "Is this honest? Is it something I would want?",
                "Listening to intuition as well as reason.",
                "Making up my mind.",
            ),
            delay_s,
        ),
    ]


DEMO_AGENT_NAMES = tuple(a.name for a in demo_agents())
