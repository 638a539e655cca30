"""``python -m magi_gateway`` is the ``magi-gateway`` command."""

from magi_gateway.cli import main

main()
