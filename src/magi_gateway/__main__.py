"""``python -m magi_gateway`` is the ``magi-gateway`` command."""

from magi_gateway.cli.main import main

main()
