"""The ASGI application: ``/ws``, the ``/v1`` HTTP API, health, readiness, metrics, console
and debug tokens."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from importlib.resources import files

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from magi_gateway.core.auth import FailureThrottle, TokenVerifier, compute_token, minute_of
from magi_gateway.core.handshake import Admission
from magi_gateway.core.jwt_auth import JwtVerifier
from magi_gateway.logs import redact_access_log
from magi_gateway.server.gateway import Gateway
from magi_gateway.server.http_api import HttpApi
from magi_gateway.server.jwt_keys import KeyFile
from magi_gateway.server.websocket import WebSocketEndpoint
from magi_gateway.settings import Settings

__all__ = ["create_app"]

#: The console is static: its script, styles and icon come from this origin only, and it
#: talks to this gateway only. ``connect-src 'self'`` covers same-origin ws:/wss: in current
#: browsers; older ones need the WebSocket origin spelled out (see ``_console_headers``).
_CONSOLE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _console_headers(host: str) -> dict[str, str]:
    """Headers of the console page served for ``host`` (the request's Host header)."""
    sockets = f" ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
    return {
        "Content-Security-Policy": _CONSOLE_POLICY.format(sockets=sockets),
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


class _ConsoleAssets(StaticFiles):
    """The console's static files, revalidated on every use (cheap 304s), so a browser
    never pairs a new ``index.html`` with an old ``console.js`` after an upgrade."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        # Every path that serves the console (``/static/index.html`` too) gets its headers.
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        response.headers.update(_console_headers(host))
        return response


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the gateway application; the gateway starts and stops with its lifespan."""
    settings = settings if settings is not None else Settings()
    redact_access_log()  # tokens travel in /ws query strings
    gateway = Gateway(settings)
    verifier = TokenVerifier(settings.fixed_secret, settings.app_secrets, settings.token_skew_minutes)
    throttle = FailureThrottle(max_failures=settings.max_auth_failures_per_min, window_s=60.0)
    keys = KeyFile(settings.jwt_keys_file)
    jwt = JwtVerifier(verifier, keys.current, audience=settings.jwt_audience, issuer=settings.jwt_issuer)
    admission = Admission(verifier, throttle, settings.cors_origin_list, jwt)
    endpoint = WebSocketEndpoint(gateway, admission)
    http_api = HttpApi(gateway, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            await http_api.aclose()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "instance": gateway.instance_id})

    async def ws_health(request: Request) -> Response:
        # The original gateway's health route (a compatibility alias of /healthz).
        return JSONResponse({"status": "healthy"})

    async def readyz(request: Request) -> Response:
        if await gateway.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        await gateway.refresh_metrics()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def console(request: Request) -> Response:
        page = files("magi_gateway").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers=_console_headers(request.headers.get("host", "")))

    async def issue_token(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            body = None
        appid = body.get("appid") if isinstance(body, dict) else None
        if not isinstance(appid, str) or not appid:
            return JSONResponse({"error": 'Body must be {"appid": "..."}', "code": "invalid_message"}, 400)
        secret = verifier.secret_for(appid)
        if secret is None:
            return JSONResponse({"error": "Unknown appid", "code": "auth_failed"}, 403)
        now = time.time()
        return JSONResponse(
            {
                "appid": appid,
                "token": compute_token(appid, secret, minute_of(now)),
                "expires_in_s": 60 * (settings.token_skew_minutes + 1) - int(now % 60),
            }
        )

    routes = [
        WebSocketRoute("/ws", endpoint.handle),
        Route("/healthz", healthz),
        Route("/ws/health", ws_health),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/", console),
        # The console's script, stylesheet and icon (shipped in the wheel with the package).
        Mount("/static", _ConsoleAssets(packages=[("magi_gateway", "static")]), name="static"),
    ]
    if settings.debug:
        routes.append(Route("/v1/token", issue_token, methods=["POST"]))
    routes.extend(http_api.routes())
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.admission = admission  # for the fast WebSocket driver (server.ws_protocol)
    app.state.settings = settings
    app.state.http_api = http_api
    return app
