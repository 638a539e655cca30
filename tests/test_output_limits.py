"""Agent output size limits (DESIGN §8c): long thinking is split, nothing lost; oversized or
unencodable finals are ``result_code`` 1 at once. Real gateway, worker and Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import orjson
import pytest
from redis.asyncio import Redis

from magi_gateway import Context, Judgement, agent
from magi_gateway.core.ids import AgentId, AppId
from magi_gateway.core.output_limits import checked_final, split_thinking
from magi_gateway.core.session import ResultCode
from magi_gateway.redis.keys import WORKER_GROUP, Keys
from magi_gateway.settings import Settings
from magi_gateway.worker.runner import Worker
from magi_gateway.worker.sdk import Agent

from ._delivery_helpers import eventually
from ._support import APPID, GatewayHandle, assert_well_formed, judge

StartWorker = Callable[..., Awaitable[Worker]]

#: Every kind of code point: ASCII, 2-, 3- and 4-byte UTF-8, and characters JSON escapes.
_MIXED = 'ab é漢🙂"\\\n\x01'


def _encoded(piece: str) -> int:
    return len(orjson.dumps(piece)) - 2


# -- the splitting itself (sans-I/O) -----------------------------------------------------


@pytest.mark.parametrize("max_bytes", [6, 7, 64, 1000, 1024])
def test_split_pieces_fit_and_join_to_the_text(max_bytes: int) -> None:
    text = _MIXED * 500
    pieces = split_thinking(text, max_bytes)
    assert "".join(pieces) == text
    assert all(piece and _encoded(piece) <= max_bytes for piece in pieces)
    # Not needlessly small: each piece but the last could not take its successor's first char.
    for piece, following in itertools.pairwise(pieces):
        assert _encoded(piece + following[0]) > max_bytes


def test_text_that_fits_is_one_piece_and_bad_text_fails_as_encoding_would() -> None:
    assert split_thinking("", 1024) == [""]
    assert split_thinking("x" * 1024, 1024) == ["x" * 1024]
    assert split_thinking("x" * 1025, 1024) == ["x" * 1024, "x"]
    with pytest.raises(TypeError):
        split_thinking("\ud800" * 2000, 1024)  # a lone surrogate has no UTF-8 form


def test_checked_final_keeps_fitting_finals_and_explains_the_others() -> None:
    data = {"judgement": "fine", "decision": "approve"}
    assert checked_final("a", ResultCode.OK, data, 1024) == (ResultCode.OK, data)
    code, big = checked_final("a", ResultCode.OK, {"judgement": "x" * 2000}, 1024)
    assert code == ResultCode.AGENT_ERROR
    assert "limit of 1024" in big["error"]
    code, bad = checked_final("a", ResultCode.OK, {"judgement": object()}, 1024)
    assert code == ResultCode.AGENT_ERROR
    assert "cannot be encoded" in bad["error"]


# -- end to end ----------------------------------------------------------------------------


async def test_a_3_mb_thought_arrives_as_several_bounded_messages(
    gateway: GatewayHandle, start_worker: StartWorker, settings: Settings
) -> None:
    thought = _MIXED * (3 * 1024 * 1024 // len(_MIXED.encode()) + 1)
    assert len(thought.encode()) > 3 * 1024 * 1024

    @agent("verbose")
    async def verbose(user_input: str, ctx: Context) -> Judgement:
        await ctx.think("short first")
        await ctx.think(thought)
        await ctx.think("short last")
        return Judgement("said it all", decision="approve")

    await start_worker([verbose])
    # The client's frame limit is websockets' default, 1 MiB: a 3 MB frame would close it.
    async with await gateway.connect() as ws:
        record = await judge(ws, ["verbose"], timeout=30)
    assert_well_formed(record, ["verbose"])
    pieces = [m["data"]["thinking"] for m in record.of_type("agent_judgement_stream")]
    assert pieces[0] == "short first"
    assert pieces[-1] == "short last"
    middle = pieces[1:-1]
    assert "".join(middle) == thought
    assert len(middle) >= len(thought.encode()) // settings.max_chunk_bytes
    assert all(_encoded(piece) <= settings.max_chunk_bytes for piece in middle)
    assert all(len(piece.encode()) <= settings.max_chunk_bytes for piece in middle)
    assert record.finals["verbose"]["result_code"] == 0


async def test_an_oversized_final_is_an_agent_error(
    gateway: GatewayHandle, start_worker: StartWorker, settings: Settings
) -> None:
    @agent("rambler")
    async def rambler(user_input: str, ctx: Context) -> Judgement:
        return Judgement("x" * settings.max_final_bytes, decision="approve")

    await start_worker([rambler])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["rambler"])
    assert_well_formed(record, ["rambler"])
    final = record.finals["rambler"]
    assert final["result_code"] == 1
    assert f"over the limit of {settings.max_final_bytes}" in final["data"]["error"]
    assert "judgement" not in final["data"]
    assert record.complete["data"]["results"] == {"rambler": {"result_code": 1}}


async def test_an_unencodable_final_is_an_agent_error_at_once(
    gateway: GatewayHandle, start_worker: StartWorker, settings: Settings, redis_client: Redis
) -> None:
    calls = 0

    class Careless(Agent):
        name = "careless"

        async def judge(self, user_input: str, ctx: Context) -> Judgement:
            nonlocal calls
            calls += 1
            return Judgement("see attachment", decision="approve", extra={"attachment": object()})

    await start_worker([Careless()])
    async with await gateway.connect() as ws:
        record = await judge(ws, ["careless"])
    assert_well_formed(record, ["careless"])
    final = record.finals["careless"]
    assert final["result_code"] == 1
    assert "cannot be encoded" in final["data"]["error"]
    stream = Keys(settings.redis_key_prefix).requests(AgentId("careless"), AppId(APPID))

    async def acknowledged() -> bool:
        return (await redis_client.xpending(stream, WORKER_GROUP))["pending"] == 0

    # Acknowledged, not left for a takeover: the agent ran once.
    await eventually(acknowledged, timeout=5, what="the request to be acknowledged")
    await asyncio.sleep(0)
    assert calls == 1
