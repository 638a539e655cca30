"""The sans-I/O core: wire messages and frames, tokens, sessions and delivery bookkeeping.

Nothing here performs I/O or imports asyncio, Redis or a web framework (an
import-linter contract in pyproject.toml keeps it so); every module is unit-tested
synchronously. The drivers in ``server``, ``worker`` and ``redis`` move bytes in and
out of it.
"""

__all__: list[str] = []
