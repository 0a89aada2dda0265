"""Malformed handshakes and frames against a live walcast, over raw sockets.

Handshakes: missing and duplicate parameters, huge values, wrong methods, missing upgrade
headers, garbage request lines: each gets a 4xx (or, for bytes that are not HTTP at all, a
closed connection), never a 5xx, and the server keeps serving.

Frames after a good upgrade: binary, oversized, invalid UTF-8, fragmented, unmasked, bogus
opcodes, reserved bits: the socket gets an answer or a close with a proper RFC 6455 code; the
process never crashes, and a bystander socket keeps receiving events.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
from dataclasses import dataclass

import pytest

from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway

pytestmark = pytest.mark.integration

WS = "/realtime/v1/websocket"
ORG = "org-hs"


def _ticket(user: str = "hs-user", org: str = ORG) -> str:
    return mint_ticket(ACCESS_TOKEN, user_id=user, organization_id=org, roles=["owner"])


def _port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


async def _exchange(gw: Gateway, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read what comes back until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw))
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        while b"\r\n\r\n" not in received:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()


def _status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def _get(target: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _upgrade_headers(key: str | None = None) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != name}


def handshake_corpus() -> list[tuple[str, bytes, set[int | None]]]:
    """(name, raw request, acceptable statuses); None = closed without an HTTP answer."""
    up = _upgrade_headers()
    t = _ticket
    huge = "A" * 100_000
    return [
        ("no parameters", _get(WS, up), {401}),
        ("no ticket", _get(f"{WS}?organizationId={ORG}", up), {401}),
        ("empty ticket", _get(f"{WS}?ws_ticket=&organizationId={ORG}", up), {401}),
        ("two tickets", _get(f"{WS}?ws_ticket={t()}&ws_ticket={t()}", up), {401}),
        (
            "two orgs",
            _get(f"{WS}?ws_ticket={t()}&organizationId={ORG}&organizationId=x", up),
            {403},
        ),
        ("other org", _get(f"{WS}?ws_ticket={t()}&organizationId=org-other", up), {403}),
        ("two since", _get(f"{WS}?ws_ticket={t()}&since=a&since=b", up), {400}),
        ("5 KB ticket", _get(f"{WS}?ws_ticket={'B' * 5000}", up), {401}),
        ("100 KB ticket", _get(f"{WS}?ws_ticket={huge}", up), {400, 414, 431}),
        ("100 KB header", _get(f"{WS}?ws_ticket={t()}", {**up, "X-Big": huge}), {400, 431}),
        ("1000 headers", _get(WS, {f"X-{i}": "v" for i in range(1000)}), {400, 401, 431}),
        ("POST upgrade", _get(f"{WS}?ws_ticket={t()}", up, method="POST"), {405}),
        ("PUT", _get(f"{WS}?ws_ticket={t()}", method="PUT"), {405}),
        ("no Upgrade", _get(f"{WS}?ws_ticket={t()}", _without(up, "Upgrade")), {400}),
        ("no Connection", _get(f"{WS}?ws_ticket={t()}", _without(up, "Connection")), {400}),
        ("no key", _get(f"{WS}?ws_ticket={t()}", _without(up, "Sec-WebSocket-Key")), {400}),
        ("bad key", _get(f"{WS}?ws_ticket={t()}", _upgrade_headers("not-base64!")), {400}),
        (
            "no version",
            _get(f"{WS}?ws_ticket={t()}", _without(up, "Sec-WebSocket-Version")),
            {400},
        ),
        (
            "version 12",
            _get(f"{WS}?ws_ticket={t()}", {**up, "Sec-WebSocket-Version": "12"}),
            {400},
        ),
        ("plain GET", _get(f"{WS}?ws_ticket={t()}"), {400}),
        (
            "HTTP/1.0 upgrade",  # aiohttp allows it; the ticket is good, so is the socket
            _get(f"{WS}?ws_ticket={t('hs-10')}", up).replace(b"HTTP/1.1", b"HTTP/1.0"),
            {101, 400},
        ),
        ("garbage line", b"GARBAGE\r\n\r\n", {400, None}),
        ("binary junk", bytes(range(256)) * 4, {400, None}),
        ("NUL in path", b"GET /realtime/v1/web\x00socket HTTP/1.1\r\nHost: x\r\n\r\n", {400, None}),
        ("HTTP/9.9", b"GET " + WS.encode() + b" HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505, None}),
        ("bad percent", _get(f"{WS}?ws_ticket=%zz%&organizationId=%ff%fe", up), {401}),
        (
            "bad chunked body",
            b"POST /realtime/v1/broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            {400},
        ),
        (
            "body length lie",
            b"POST /realtime/v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            {400},
        ),
    ]


async def test_malformed_handshakes_never_5xx_and_the_server_keeps_serving(gw: Gateway) -> None:
    bystander = await gw.connect(gw.add_member("hs-by", ORG, "owner"), ORG)
    failures = []
    for name, request, acceptable in handshake_corpus():
        status = _status(await _exchange(gw, request))
        if status not in acceptable:
            failures.append((name, status, acceptable))
    assert not failures
    async with gw.http.get(f"{gw.url}/healthz") as response:
        assert response.status == 200
    # An upgrade refused before it happened does not burn the ticket: the client may retry.
    ticket = _ticket("hs-retry")
    assert _status(await _exchange(gw, _get(f"{WS}?ws_ticket={ticket}"))) == 400
    sock = await gw.connect_ticket(ticket, ORG)
    response = await gw.broadcast({"organizationId": ORG, "event": "after-corpus"})
    assert response.status == 202
    for client in (bystander, sock):
        await client.wait_for(lambda m: m.get("event") == "after-corpus")


# -- frames after the upgrade ----------------------------------------------------------------


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class RawSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload), or None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            size = head[1] & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return head[0] & 0x0F, await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    async def close_code(self) -> int | None:
        """Read until the server's close frame (its code) or EOF (None)."""
        while (frame := await self.frame()) is not None:
            opcode, payload = frame
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        return None

    def close(self) -> None:
        self.writer.close()


async def open_raw(gw: Gateway, user: str) -> RawSocket:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw))
    writer.write(_get(f"{WS}?ws_ticket={_ticket(user)}&organizationId={ORG}", _upgrade_headers()))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock = RawSocket(reader, writer)
    opcode, payload = await sock.frame() or (0, b"")
    assert opcode == 0x1 and b'"ready"' in payload
    return sock


TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9

# (name, frames to send, expected close codes; None = stays open and answers `ping`, -1 = the
# server dropped the connection: it closes at once on an oversized frame header, leaving the
# rest unread, so the kernel's RST may overtake its 1009 close frame).
FRAME_CASES: list[tuple[str, list[bytes], set[int | None]]] = [
    ("binary frame", [client_frame(BINARY, b"\x00\xff" * 10)], {None}),
    ("fragmented ping", [client_frame(TEXT, b"pi", fin=False), client_frame(0, b"ng")], {None}),
    ("ping control frame", [client_frame(PING, b"hello")], {None}),
    ("oversized text", [client_frame(TEXT, b"x" * (64 * 1024 + 1))], {1009, -1}),
    (
        "oversized in fragments",
        [client_frame(TEXT, b"x" * 40_000, fin=False), client_frame(0, b"x" * 40_000)],
        {1009, -1},
    ),
    ("invalid UTF-8", [client_frame(TEXT, b"\xff\xfe\xc3\x28")], {1007}),
    ("continuation first", [client_frame(CONTINUATION, b"ng")], {1002}),
    ("bogus opcode 3", [client_frame(0x3, b"x")], {1002}),
    ("bogus opcode 0xB", [client_frame(0xB, b"x")], {1002}),
    ("reserved bits", [client_frame(TEXT, b"ping", rsv=0b100)], {1002}),
    ("fragmented control", [client_frame(PING, b"x", fin=False)], {1002}),
    ("control over 125 bytes", [client_frame(PING, b"x" * 126)], {1002}),
    ("close with bad code", [client_frame(CLOSE, struct.pack("!H", 999))], {1002}),
    ("close with bad UTF-8", [client_frame(CLOSE, struct.pack("!H", 1000) + b"\xff")], {1007}),
]


async def _after(sock: RawSocket, expected: set[int | None]) -> int | None:
    if None not in expected:
        code = await sock.close_code()
        return -1 if code is None else code
    sock.writer.write(client_frame(TEXT, b"ping"))
    while (frame := await sock.frame()) is not None:
        opcode, payload = frame
        if opcode == TEXT and payload == b"pong":
            return None
        if opcode == CLOSE:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    return -1  # EOF without a close frame


async def test_malformed_frames_close_properly_and_others_keep_receiving(gw: Gateway) -> None:
    bystander = await gw.connect(gw.add_member("fr-by", ORG, "owner"), ORG)
    outcomes = {}
    for index, (name, frames, expected) in enumerate(FRAME_CASES):
        sock = await open_raw(gw, f"fr-{index}")
        try:
            for frame in frames:
                sock.writer.write(frame)
            await sock.writer.drain()
            outcomes[name] = (await _after(sock, expected), expected)
        finally:
            sock.close()
    assert {name: got for name, (got, want) in outcomes.items() if got not in want} == {}
    response = await gw.broadcast({"organizationId": ORG, "event": "after-frames"})
    assert response.status == 202
    await bystander.wait_for(lambda m: m.get("event") == "after-frames")


async def test_unmasked_client_frames_never_crash_the_server(gw: Gateway) -> None:
    """RFC 6455 §5.1 says a server must close on an unmasked client frame; aiohttp tolerates
    them. Either is safe here: what matters is that nothing breaks and nobody else notices."""
    bystander = await gw.connect(gw.add_member("um-by", ORG, "owner"), ORG)
    sock = await open_raw(gw, "um-1")
    try:
        sock.writer.write(client_frame(TEXT, b"ping", masked=False))
        outcome = await _after(sock, {None})
        assert outcome in (None, 1002)
    finally:
        sock.close()
    response = await gw.broadcast({"organizationId": ORG, "event": "after-unmasked"})
    assert response.status == 202
    await bystander.wait_for(lambda m: m.get("event") == "after-unmasked")


async def test_parse_errors_never_log_tickets_or_secrets(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's parser quotes the raw request line in its error log; gateway.redact strips it."""
    caplog.set_level(logging.DEBUG)
    ticket = _ticket("log-user")
    secret = ACCESS_TOKEN.encode()
    requests = [
        f"GET {WS}?ws_ticket={ticket}&a=\x01b HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET {WS}?ws_ticket={ticket}{'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET {WS}?ws_ticket={ticket} HTTP/9.9\r\nHost: x\r\n\r\n".encode(),
        b"POST /realtime/v1/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + secret
        + b"\x01\r\n\r\n",
        b"POST /realtime/v1/broadcast HTTP/1.1\r\nX-Internal-Secret: " + secret + b"\x7f\r\n\r\n",
    ]
    for request in requests:
        assert _status(await _exchange(gw, request)) == 400
    assert any("malformed HTTP request refused" in r.getMessage() for r in caplog.records)
    assert ticket not in caplog.text and ACCESS_TOKEN not in caplog.text
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= 30]
