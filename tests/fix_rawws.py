"""WebSockets on raw sockets, for attacks an aiohttp client cannot make: a client that stops
reading right after the handshake, and the server's frames read back from the bytes."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

CLOSE = 0x8


async def stalled_socket(
    port: int, ticket: str, org: str, *, since: str | None = None
) -> socket.socket:
    """A raw WebSocket that stops reading right after the handshake (live: after `ready`); its
    receive buffer is tiny, so the server soon has to hold what it sends."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    query = f"ws_ticket={ticket}&organizationId={org}"
    if since is not None:
        query += f"&since={since}"
    request = (
        f"GET /realtime/v1/websocket?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    received = b""
    # A resume reads the response head byte by byte: its frames are read later, whole.
    until, size = (b"\r\n\r\n", 1) if since is not None else (b'"ready"', 1024)
    while until not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, size), 10)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 101"), received
    return sock


async def read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """Every byte until the server closes (or resets) the connection; TimeoutError if it goes
    quiet for `timeout` seconds first."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete server frame in `data`."""
    out, index = [], 0
    while index + 2 <= len(data):
        opcode, size = data[index] & 0x0F, data[index + 1] & 0x7F
        index += 2
        if size == 126:
            size = struct.unpack_from("!H", data, index)[0]
            index += 2
        elif size == 127:
            size = struct.unpack_from("!Q", data, index)[0]
            index += 8
        if index + size > len(data):
            break
        out.append((opcode, bytes(data[index : index + size])))
        index += size
    return out


def close_codes(data: bytes) -> list[int]:
    """The codes of the close frames in `data`."""
    return [
        struct.unpack_from("!H", payload)[0]
        for opcode, payload in frames(data)
        if opcode == CLOSE and len(payload) >= 2
    ]
