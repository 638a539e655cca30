"""The ``limit`` baseline worker: streams the bench agent's frames, ready-made, to the gateway.

``python -m magi_gateway.bench.limit_worker --redis-url URL [--prefix P] [--name N]
[--chunks K] [--bytes B] [--delay D]``

It shares no code with the product. It pops session ids (BLMPOP, many at a time) from the
list the baseline gateways push on and, for each, PUBLISHes on that gateway's channel K
``agent_judgement_stream`` frames whose ``data.thinking`` is the send time
(``time.time_ns()`` in decimal), a space and ``x`` padding up to B bytes (the stamp alone
when B is shorter), D seconds apart; then ``agent_judgement_final`` and
``agent_judgement_complete``, with seq numbers following the gateway's accepted (1).
Every message is a complete client frame prefixed by ``session_id\\n``. Commands of one
event-loop tick go out in one write; their replies are not awaited (an error reply stops
the worker). Once connected it sets its ``ready_key`` so the harness knows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

from magi_gateway.bench.limit_keys import frames_channel, ready_key, redis_address, requests_key
from magi_gateway.bench.limit_resp import RespConnection

__all__ = ["LimitWorker", "main"]

#: Session ids taken per BLMPOP, and its timeout (to notice a stop).
_POP_COUNT = b"1000"
_POP_TIMEOUT_S = b"1"
#: The frames, as % templates of (session id, seq, thinking or result).
_STREAM = (
    b'{"type":"agent_judgement_stream","session_id":"%s","seq":%d,'
    b'"agent_id":"bench","data":{"thinking":"%s"}}'
)
_FINAL = (
    b'{"type":"agent_judgement_final","session_id":"%s","seq":%d,'
    b'"agent_id":"bench","result_code":0,"data":%s}'
)
_COMPLETE = (
    b'{"type":"agent_judgement_complete","session_id":"%s","seq":%d,'
    b'"data":{"verdict":"approve","results":{"bench":%s}}}'
)
_RESULT = b'{"reason":"done","decision":"approve"}'


class LimitWorker:
    """Turns each popped session id into its K + 2 frames, published on its gateway's channel."""

    def __init__(
        self, redis: RespConnection, prefix: str, *, chunks: int, chunk_bytes: int, delay_s: float
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.chunks = chunks
        self.padding = b"x" * chunk_bytes
        self.delay_s = delay_s
        self.paced: set[asyncio.Task[None]] = set()

    def chunk(self) -> bytes:
        """One chunk's text: the send stamp, a space, padding up to ``chunk_bytes``."""
        stamp = b"%d " % time.time_ns()
        return stamp + self.padding[len(stamp) :]

    def _publish(self, session_id: bytes, frame: bytes) -> None:
        channel = frames_channel(self.prefix, session_id.partition(b".")[0])
        self.redis.send(b"PUBLISH", channel, session_id + b"\n" + frame)

    def _stream(self, session_id: bytes, seq: int) -> None:
        self._publish(session_id, _STREAM % (session_id, seq, self.chunk()))

    def _finish(self, session_id: bytes) -> None:
        seq = self.chunks + 2
        self._publish(session_id, _FINAL % (session_id, seq, _RESULT))
        self._publish(session_id, _COMPLETE % (session_id, seq + 1, _RESULT))

    def start(self, session_id: bytes) -> None:
        """Stream one session: all at once, or as a task sleeping ``delay_s`` between chunks."""
        if not self.delay_s:
            for index in range(self.chunks):
                self._stream(session_id, index + 2)
            self._finish(session_id)
            return
        task = asyncio.create_task(self._paced(session_id))
        self.paced.add(task)
        task.add_done_callback(self.paced.discard)

    async def _paced(self, session_id: bytes) -> None:
        for index in range(self.chunks):
            self._stream(session_id, index + 2)
            await asyncio.sleep(self.delay_s)
        self._finish(session_id)


async def work(
    redis_url: str, prefix: str, name: str, *, chunks: int, chunk_bytes: int, delay_s: float
) -> None:
    """Pop and stream sessions until SIGTERM or SIGINT."""
    host, port = redis_address(redis_url)
    pop = await RespConnection.open(host, port)
    publish = await RespConnection.open(host, port)
    worker = LimitWorker(publish, prefix, chunks=chunks, chunk_bytes=chunk_bytes, delay_s=delay_s)
    key = requests_key(prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await pop.call(b"SET", ready_key(prefix, name), b"1")
    try:
        while not stop.is_set():
            reply = await pop.call(b"BLMPOP", _POP_TIMEOUT_S, b"1", key, b"LEFT", b"COUNT", _POP_COUNT)
            if reply is None:
                continue
            for session_id in reply[1]:
                worker.start(session_id)
            if publish.closed.done():
                publish.closed.result()
    finally:
        for task in worker.paced:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*worker.paced, return_exceptions=True)
        pop.close()
        publish.close()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--name", default="limit-worker")
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=100, dest="chunk_bytes")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(
        work(
            args.redis_url,
            args.prefix,
            args.name,
            chunks=args.chunks,
            chunk_bytes=args.chunk_bytes,
            delay_s=args.delay,
        )
    )


if __name__ == "__main__":
    main()
