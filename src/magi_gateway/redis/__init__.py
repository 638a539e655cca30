"""The Redis layer: connections and their error boundary, key names, the Lua scripts,
and every command the gateway and the workers send.

It imports nothing of ``server``, ``worker``, ``cli`` or ``bench`` (import-linter).
"""

__all__: list[str] = []
