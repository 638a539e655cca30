"""Small agents used by the tests, importable as ``tests.agents_for_tests:NAME``.

They are loaded both in-process (``Worker([...])``) and by ``magi-gateway agent
tests.agents_for_tests:echo`` subprocesses, so they must not depend on test state.
"""

from __future__ import annotations

from magi_gateway import Agent, AgentError, Context, Judgement, agent


@agent("echo")
async def echo(user_input: str, ctx: Context) -> Judgement:
    """Streams one chunk, then approves with the input echoed."""
    await ctx.think(f"echo is reading {user_input!r}")
    return Judgement(f"echo: {user_input}", decision="approve")


class KlassAgent(Agent):
    """A class-based agent: streams two chunks, then rejects."""

    name = "klass"

    async def judge(self, user_input: str, ctx: Context) -> Judgement:
        await ctx.think("klass: first thought")
        await ctx.think("klass: second thought")
        return Judgement(f"klass rejects {user_input}", decision="reject", extra={"kind": "class"})


@agent("plain")
async def plain(user_input: str, ctx: Context) -> str:
    """Returns a bare string: a judgement without a decision."""
    return "just text"


@agent("refuser")
async def refuser(user_input: str, ctx: Context) -> Judgement:
    """Fails with a message meant for the client."""
    raise AgentError("nope")


SECRET_DETAIL = "db password is hunter2 at /srv/internal.py line 42"


@agent("crasher")
async def crasher(user_input: str, ctx: Context) -> Judgement:
    """Fails with an unexpected exception whose text must not reach the client."""
    raise RuntimeError(SECRET_DETAIL)


#: A list of agents, as ``module:object`` may name one.
AGENTS = [echo, KlassAgent()]

#: Not an agent, for the loader's error path.
NOT_AN_AGENT = 42
