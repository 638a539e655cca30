"""Running the long-lived processes of the command line: uvicorn for the gateway, and the
worker or legacy bridge until a signal. Shutdown on SIGINT/SIGTERM, top to bottom:
close clients with 1012 after flushing, stop uvicorn (the app's lifespan stops the
gateway: background tasks, then Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Protocol

import uvicorn
from starlette.applications import Starlette

from magi_gateway.server.gateway import Gateway
from magi_gateway.server.http_protocol import http_protocol
from magi_gateway.server.ws_protocol import fast_websocket_class
from magi_gateway.settings import Settings

__all__ = [
    "Runnable",
    "Server",
    "fast_loop_factory",
    "run_until_signal",
    "serve_until_signal",
    "uvicorn_config",
]


def uvicorn_config(asgi: Starlette, settings: Settings, host: str, port: int, level: str) -> uvicorn.Config:
    """uvicorn's configuration for the gateway app.

    ``WS_IMPL=fast`` (the default) serves ``/ws`` with the gateway's own protocol class
    (``server.ws_protocol``); the others are uvicorn's, through the ASGI app.
    """
    ws: str | type[asyncio.Protocol] = settings.ws_impl
    if settings.ws_impl == "fast":
        ws = fast_websocket_class(asgi.state.gateway, asgi.state.admission)
    return uvicorn.Config(
        asgi,
        host=host,
        port=port,
        log_level=level,
        lifespan="on",
        ws=ws,
        # Handshake timeout, bounded request heads (431), MAX_CONNECTIONS (503).
        http=http_protocol(settings),
        # X-Forwarded-For only from the proxies named (uvicorn would trust loopback by default).
        proxy_headers=settings.trusts_proxies,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # JSON logs: uvicorn's loggers propagate to the root handler instead of their own.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        # Frames up to 4x the protocol limit reach the gateway and get a clear error;
        # only larger ones are cut by the transport (close 1009).
        ws_max_size=4 * settings.max_frame_bytes,
    )


class Server(uvicorn.Server):
    """uvicorn server whose signals are handled by ``serve_until_signal``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises captured signals on exit: the process would die by SIGTERM
        # (exit status 143) and `up` could not stop its Redis and demo worker after it.
        yield


async def serve_until_signal(server: Server, gateway: Gateway) -> None:
    """Serve until SIGINT/SIGTERM; then close clients with 1012 (after flushing) and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    stopping = asyncio.create_task(stop.wait(), name="signals")
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not serving.done():
        await gateway.close_connections()
        server.should_exit = True
    await serving


class Runnable(Protocol):
    """A worker or a legacy bridge: ``run`` until ``stop`` is called."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signal(runnable: Runnable) -> None:
    """Run on uvloop (when installed) until done; SIGINT/SIGTERM call ``stop``."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runnable.stop)
        await runnable.run()

    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        runner.run(main())


def fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it comes with uvicorn[standard]), as uvicorn picks for the gateway."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a platform without uvloop wheels
        return None
    return uvloop.new_event_loop
