"""The gateway server: the ASGI app, the WebSocket driver, per-connection outboxes,
in-order delivery, and this instance's lifecycle, listener and timeout sweep."""

__all__: list[str] = []
