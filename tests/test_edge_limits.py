"""Slowloris and oversized heads (#12 item 4), with raw sockets against a ``magi-gateway serve``
subprocess: the handshake timeout, 431 for oversized request lines and headers, and the
per-instance connection limit (503)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ._support import SECRET, GatewayHandle, make_token, spawn_gateway, stop_process

TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3
UPGRADE = (
    "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.fixture
def edge_gateway(redis_url: str, key_prefix: str) -> Iterator[GatewayHandle]:
    handle = spawn_gateway(
        {
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": key_prefix,
            "FIXED_SECRET": SECRET,
            "HANDSHAKE_TIMEOUT_S": str(TIMEOUT_S),
            "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
        log_level="warning",
    )
    try:
        yield handle
    finally:
        assert handle.process is not None
        stop_process(handle.process)


def raw_socket(handle: GatewayHandle) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", handle.port), timeout=10)
    sock.settimeout(10)  # far beyond TIMEOUT_S: a socket still open then was not closed
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def ws(handle: GatewayHandle, stack: contextlib.ExitStack) -> ClientConnection:
    connection = stack.enter_context(connect(handle.ws_url(token=make_token()), open_timeout=10))
    assert '"connection_established"' in str(connection.recv(timeout=10))
    return connection


def refusals(handle: GatewayHandle, reason: str) -> float:
    """``magi_edge_refusals_total{reason}`` as the gateway's ``/metrics`` shows it."""
    text = httpx.get(f"{handle.http}/metrics", timeout=5).text
    line = f'magi_edge_refusals_total{{reason="{reason}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def test_a_socket_that_sends_nothing_is_closed_after_the_timeout(edge_gateway: GatewayHandle) -> None:
    with raw_socket(edge_gateway) as sock:
        assert read_to_eof(sock) == b""


def test_a_partial_header_is_closed_after_the_timeout(edge_gateway: GatewayHandle) -> None:
    with raw_socket(edge_gateway) as sock:
        sock.sendall(b"GET /ws?appid=a&token=b HTTP/1.1\r\n" + UPGRADE.encode())  # no blank line
        assert read_to_eof(sock) == b""
    assert refusals(edge_gateway, "handshake_timeout") >= 1


def test_slow_header_bytes_do_not_reset_the_timeout(edge_gateway: GatewayHandle) -> None:
    with raw_socket(edge_gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for _ in range(100):  # one header byte every 0.05 s, for at most 5 s
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        assert closed or read_to_eof(sock) == b""


def test_an_open_websocket_outlives_the_timeout(edge_gateway: GatewayHandle) -> None:
    with contextlib.ExitStack() as stack:
        connection = ws(edge_gateway, stack)
        time.sleep(3 * TIMEOUT_S)
        connection.send('{"type":"ping"}')
        assert connection.recv(timeout=10) == '{"type":"pong"}'


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(f"GET /ws?appid=a&token={'x' * 9000} HTTP/1.1\r\n{UPGRADE}\r\n", id="request-line"),
        pytest.param(f"GET /ws HTTP/1.1\r\n{UPGRADE}X-Big: {'y' * 9000}\r\n\r\n", id="header-line"),
        pytest.param("GET /healthz HTTP/1.1\r\n" + "X-A: b\r\n" * 200 + "\r\n", id="header-count"),
        pytest.param("GET /healthz HTTP/1.1\r\n" + f"X-A: {'z' * 4000}\r\n" * 20 + "\r\n", id="head-size"),
        pytest.param(f"GET /healthz HTTP/1.1\r\nX-A: {'w' * 100_000}", id="unfinished-header"),
    ],
)
def test_an_oversized_head_is_answered_431_and_closed(edge_gateway: GatewayHandle, head: str) -> None:
    with raw_socket(edge_gateway) as sock:
        sock.sendall(head.encode())
        answer = read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in answer.lower()
    # The gateway is unharmed.
    assert httpx.get(f"{edge_gateway.http}/healthz", timeout=5).status_code == 200
    assert refusals(edge_gateway, "head_too_large") == 1


def test_connections_beyond_the_limit_are_refused(edge_gateway: GatewayHandle) -> None:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())
        open_ones = [ws(edge_gateway, first)] + [ws(edge_gateway, stack) for _ in range(MAX_CONNECTIONS - 1)]
        with pytest.raises(InvalidStatus) as refused:
            ws(edge_gateway, stack)
        assert refused.value.response.status_code == 503
        readyz = httpx.get(f"{edge_gateway.http}/readyz", timeout=5)
        assert (readyz.status_code, readyz.text) == (503, "Too many connections")
        # The liveness probe is exempt: a full instance is not restarted for being full.
        assert httpx.get(f"{edge_gateway.http}/healthz", timeout=5).status_code == 200
        for connection in open_ones:  # the refusals closed nothing else
            connection.send('{"type":"ping"}')
            assert connection.recv(timeout=10) == '{"type":"pong"}'
        first.close()
        # Room again: the next connection gets through once the server has seen the close.
        for _ in range(100):
            try:
                ws(edge_gateway, stack)
                break
            except InvalidStatus:
                time.sleep(0.05)
        else:
            raise AssertionError("no room after a connection closed")
    # Counted: the WebSocket upgrade and /readyz at least (read once the connections are closed).
    for _ in range(100):
        metrics = httpx.get(f"{edge_gateway.http}/metrics", timeout=5)
        if metrics.status_code == 200:
            break
        time.sleep(0.05)
    assert refusals(edge_gateway, "too_many_connections") >= 2
