"""``main:app``: the gateway app, started by its lifespan or, without one, by its first use.

An ASGI server that runs no lifespan (``uvicorn main:app --lifespan off``, a Starlette
``TestClient`` used without ``with``) never calls the app's startup. ``LazyStartApp``
then starts the gateway on the first request or WebSocket, once per event loop: the
first use on a loop creates the task that runs the gateway (``_run``) and every use
waits for its start, so concurrent first requests start it once. That task lives as
long as the loop and stops the gateway when the loop's tasks are cancelled at its end
(``asyncio.run``'s shutdown). A ``TestClient`` without ``with`` runs each request in a
loop of its own: each such loop gets a fresh gateway instance (sessions live in Redis,
so one can resume what an earlier one started).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from magi_gateway.server.app import create_app
from magi_gateway.server.gateway import Gateway
from magi_gateway.settings import Settings

__all__ = ["LazyStartApp", "lazy_app"]


class LazyStartApp:
    """An ASGI app wrapping the gateway app (``build`` makes one; see the module's docstring)."""

    def __init__(self, build: Callable[[], Starlette]) -> None:
        self._build = build
        self._app = build()
        self._fresh = True  # self._app's gateway has not been started yet
        #: The loop on which self._app's gateway runs (by the lifespan or by ``_run``).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # loops of different threads (TestClient portals)

    @property
    def state(self) -> State:
        """The current app's state (``gateway``, ``admission``, ``settings``)."""
        return self._app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        if scope["type"] == "lifespan":
            with self._lock:
                self._loop, self._fresh, app = loop, False, self._app
            await app(scope, receive, send)
            return
        app = self._app if self._loop is loop else await self._start_on(loop)
        await app(scope, receive, send)

    async def _start_on(self, loop: asyncio.AbstractEventLoop) -> Starlette:
        """Start a gateway on ``loop`` unless one runs there; return its app once started."""
        with self._lock:
            if self._loop is not loop:
                if not self._fresh:
                    self._app = self._build()  # the earlier gateway belongs to another loop
                self._fresh, self._loop = False, loop
                self._started = loop.create_future()
                self._task = loop.create_task(self._run(self._app.state.gateway, self._started))
            app, started = self._app, self._started
        assert started is not None
        try:
            await asyncio.shield(started)
        except Exception:
            with self._lock:
                if self._started is started:
                    self._loop = None  # the next request tries again, with a fresh gateway
            raise
        return app

    @staticmethod
    async def _run(gateway: Gateway, started: asyncio.Future[None]) -> None:
        """Start ``gateway``, then keep it running until this task is cancelled (the loop ends)."""
        try:
            await gateway.start()
        except BaseException as exc:
            if not started.done():
                started.set_exception(
                    exc if isinstance(exc, Exception) else RuntimeError("gateway not started")
                )
            raise
        started.set_result(None)
        try:
            await asyncio.Event().wait()
        finally:
            await gateway.stop()

    def __getattr__(self, name: str) -> Any:
        # Anything else (routes, middleware, url_path_for) is the current app's.
        return getattr(self._app, name)


def lazy_app(settings: Settings | None = None) -> LazyStartApp:
    """The gateway app of ``create_app(settings)`` that also starts without a lifespan."""
    chosen = settings if settings is not None else Settings()
    return LazyStartApp(lambda: create_app(chosen))
