"""Commands packed by hiredis, in C, for redis-py's asyncio connections.

redis-py's synchronous connections pack commands with hiredis when it is installed;
its asyncio ones always pack in Python, argument by argument (``Encoder.encode``). In
the relay benchmark that was about a tenth of the gateway's CPU: a judgement's scripts
carry 15 to 35 arguments each, a worker's chunk batches more. Hand-written because no
option of redis-py selects the C packer for asyncio; it is one method, the wire bytes
are the same RESP. Cluster clients keep redis-py's packer (their connection class is
not configurable).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection

__all__ = ["with_hiredis_packing"]


def _pack(args: tuple[Any, ...]) -> bytes:
    name = args[0]
    # A command name of several words ("CLIENT SETINFO") is several arguments.
    if isinstance(name, str):
        if " " in name:
            args = (*name.split(), *args[1:])
    elif b" " in name:
        args = (*name.split(), *args[1:])
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError:  # hiredis takes str, int, float and bytes: not bytearray or memoryview
        args = tuple(bytes(arg) if isinstance(arg, (bytearray, memoryview)) else arg for arg in args)
        packed = hiredis.pack_command(args)
    return packed


_PACKED: dict[str, type[AbstractConnection]] = {}


def with_hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` with its commands packed by ``hiredis.pack_command``."""
    name = f"{connection_class.__module__}.{connection_class.__qualname__}"
    if name not in _PACKED:
        _PACKED[name] = _packed(connection_class)
    return _PACKED[name]


def _packed(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        return [_pack(args)]

    def pack_commands(self: AbstractConnection, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(_pack(tuple(command)) for command in commands)]

    namespace = {"pack_command": pack_command, "pack_commands": pack_commands, "__module__": __name__}
    return type(f"HiredisPacked{connection_class.__name__}", (connection_class,), namespace)
