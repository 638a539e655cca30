"""``redis.packing``: commands packed by hiredis make the same RESP as redis-py's own
packer, whatever the argument types, and run on a real Redis."""

from __future__ import annotations

from redis.asyncio.connection import Connection

from magi_gateway.redis.client import connect, redis_errors
from magi_gateway.redis.packing import with_hiredis_packing
from magi_gateway.settings import Settings

COMMANDS = [
    ("SET", "key", "value"),
    (b"EVALSHA", b"f" * 40, 2, "k1", "k2", 1.5, -7, b"\x00\xff"),
    ("SET", "key", bytearray(b"from a bytearray")),  # not taken by hiredis itself
    ("SET", "key", memoryview(b"from a memoryview")),
    ("CLIENT SETNAME", "two-word-name"),  # one command name of two words
    (b"CLIENT GETNAME",),
]


def test_hiredis_packing_makes_the_bytes_redis_py_makes() -> None:
    plain = Connection()
    packed = with_hiredis_packing(Connection)()
    for command in COMMANDS:
        assert b"".join(packed.pack_command(*command)) == b"".join(plain.pack_command(*command)), command
    assert packed.pack_commands(COMMANDS) == [b"".join(b"".join(plain.pack_command(*c)) for c in COMMANDS)]


async def test_packed_commands_of_every_argument_type_run(settings: Settings, key_prefix: str) -> None:
    client = connect(settings)
    assert client.connection_pool.connection_class.__name__.startswith("HiredisPacked")
    key = f"{key_prefix}:packed"
    values: list[tuple[object, bytes]] = [
        (bytearray(b"a bytearray"), b"a bytearray"),
        (memoryview(b"a memoryview"), b"a memoryview"),
        (12.5, b"12.5"),
        (7, b"7"),
        ("text", b"text"),
    ]
    try:
        with redis_errors():
            for value, stored in values:
                await client.set(key, value)  # type: ignore[arg-type]
                assert await client.get(key) == stored
            await client.execute_command("CLIENT SETNAME", "packed-by-hiredis")
            assert await client.execute_command("CLIENT GETNAME") == "packed-by-hiredis"  # decoded
    finally:
        await client.aclose()
