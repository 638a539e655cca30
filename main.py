"""The original entry point, kept working: ``python main.py`` or ``uvicorn main:app``.

Configuration comes from the environment and ``.env`` (see README, Configuration). The
app starts its gateway with the ASGI lifespan, or on its first request when the server
runs none (``uvicorn main:app --lifespan off``; see ``magi_gateway.server.lazy``).
"""

from magi_gateway.server.lazy import lazy_app
from magi_gateway.settings import Settings

settings = Settings()
app = lazy_app(settings)

if __name__ == "__main__":
    import uvicorn

    from magi_gateway.server.http_protocol import http_protocol

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=4 * settings.max_frame_bytes,
        http=http_protocol(settings),  # handshake timeout, 431 for oversized heads, MAX_CONNECTIONS
        proxy_headers=settings.trusts_proxies,  # X-Forwarded-For from FORWARDED_ALLOW_IPS only
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
