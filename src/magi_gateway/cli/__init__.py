"""The ``magi-gateway`` command line (``python -m magi_gateway`` is the same)."""

from magi_gateway.cli.main import app, main

__all__ = ["app", "main"]
