"""Connection exhaustion, attacked against a real `walcast serve` on loopback: slowloris, idle and
keep-alive connections, one address holding too many connections, and running out of file
descriptors (gateway.server). Timeouts are set to a second or two so each attack is short.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import resource
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.server import address_key
from tests.fix_gateway import ACCESS_TOKEN, add_member, clean_env, free_port, walcast_command
from tests.fix_serve import stop_process, wait_ready
from tests.pg import PostgresServer
from walcast.cli import apply_migrations

IDLE, HEADER, KEEPALIVE, CAP = 1.0, 1.5, 4.0, 3


@dataclass
class Walcast:
    url: str
    port: int
    dsn: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def walcast_serve(
    dsn: str,
    workdir: Path,
    *,
    preexec: Callable[[], None] | None = None,
    **env: str,
) -> Iterator[Walcast]:
    """`walcast serve` in its own process, ready (`/readyz` is 200) when this yields."""
    apply_migrations(dsn)
    port = free_port()
    log = workdir / f"walcast-{port}.log"
    suffix = uuid.uuid4().hex[:12]
    environment = clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_PORT=str(port),
        WALCAST_SLOT=f"cl_{suffix}",
        WALCAST_PUBLICATION=f"cl_{suffix}",
        **env,
    )
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*walcast_command(), "--log-format", "text", "serve"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=preexec,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Synchronous, and sometimes called from inside a test's event loop: wait on a loop of
        # its own, in a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, wait_ready(url, process=process, log=log)).result()
        yield Walcast(url, port, dsn, log)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def walcast(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Walcast]:
    """One node with short timeouts and a cap of `CAP` connections per address."""
    with (
        pg_server.fresh_database() as dsn,
        walcast_serve(
            dsn,
            tmp_path_factory.mktemp("connlimits"),
            WALCAST_IDLE_TIMEOUT_SECONDS=str(IDLE),
            WALCAST_HEADER_TIMEOUT_SECONDS=str(HEADER),
            WALCAST_KEEPALIVE_TIMEOUT_SECONDS=str(KEEPALIVE),
            WALCAST_MAX_CONNECTIONS_PER_ADDRESS=str(CAP),
        ) as node,
    ):
        yield node


async def _open(
    node: Walcast, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.port, local_addr=(source, 0))


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection (EOF or reset; inf: still open after
    `limit`), and what it sent."""
    start = time.monotonic()
    received = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return math.inf, received
    except ConnectionResetError:
        pass
    return time.monotonic() - start, received


async def _healthz(node: Walcast, source: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{node.url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status


async def test_slowloris_headers_are_closed_after_the_header_timeout(walcast: Walcast) -> None:
    reader, writer = await _open(walcast)
    request = b"GET /healthz HTTP/1.1\r\nHost: walcast\r\nX-Padding: " + b"a" * 200

    async def trickle() -> None:  # one byte every 100 ms: never idle, never complete
        with contextlib.suppress(ConnectionError):
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle())
    try:
        elapsed, _ = await _closed_after(reader, 6.0)
    finally:
        sender.cancel()
        writer.close()
    assert HEADER - 0.2 <= elapsed < HEADER + 1.0, f"closed after {elapsed:.2f} s"


async def test_idle_connection_is_closed(walcast: Walcast) -> None:
    reader, writer = await _open(walcast)
    elapsed, received = await _closed_after(reader, 6.0)
    writer.close()
    assert received == b""
    assert IDLE - 0.2 <= elapsed < IDLE + 1.0, f"closed after {elapsed:.2f} s"


async def test_idle_keepalive_connection_is_closed(walcast: Walcast) -> None:
    reader, writer = await _open(walcast)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: walcast\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    elapsed, received = await _closed_after(reader, 10.0)
    writer.close()
    assert received == b""
    assert KEEPALIVE - 0.3 <= elapsed < KEEPALIVE + 1.5, f"closed after {elapsed:.2f} s"


async def test_one_address_over_the_cap_is_refused_and_others_still_connect(
    walcast: Walcast,
) -> None:
    org = f"org_{uuid.uuid4().hex[:8]}"
    token = add_member(walcast.dsn, "u1", org, "member")
    # Tickets come from another address, so only the WebSockets count against 127.0.0.1.
    tickets_from = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=tickets_from) as tickets,
        aiohttp.ClientSession() as http,
    ):

        async def connect() -> aiohttp.ClientWebSocketResponse:
            async with tickets.post(
                f"{walcast.url}/realtime/v1/ws-ticket",
                headers={"Authorization": f"Bearer {token}"},
                json={"organizationId": org},
            ) as response:
                assert response.status == 200, await response.text()
                ticket = (await response.json())["wsTicket"]
            return await http.ws_connect(
                f"{walcast.url}/realtime/v1/websocket",
                params={"ws_ticket": ticket, "organizationId": org},
            )

        sockets = [await connect() for _ in range(CAP)]
        await asyncio.sleep(HEADER + 0.5)  # upgraded sockets outlive the pre-request timers
        assert not any(ws.closed for ws in sockets)

        reader, writer = await _open(walcast)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: walcast\r\n\r\n")
        _, answer = await _closed_after(reader, 3.0)
        writer.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 429"), answer[:100]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect()
        assert refused.value.status == 429

        assert await _healthz(walcast, "127.0.0.2") == 200

        await sockets.pop().close()
        deadline = time.monotonic() + 3
        while True:  # the server counts the closed socket out as soon as it sees the close
            try:
                sockets.append(await connect())
                break
            except aiohttp.WSServerHandshakeError:
                assert time.monotonic() < deadline, "a freed slot was never reused"
                await asyncio.sleep(0.1)
        for ws in sockets:
            await ws.close()


FD_LIMIT = 200


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        (("203.0.113.7", 50000), "203.0.113.7"),
        (("::ffff:203.0.113.7", 50000, 0, 0), "203.0.113.7"),
        (("2001:db8:1:2:aaaa::1", 50000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 50000, 0, 0), "2001:db8:1:2::/64"),
        ("/run/walcast.sock", None),
        (None, None),
    ],
)
def test_connections_count_against_an_ipv4_address_or_an_ipv6_64(
    peername: object, key: str | None
) -> None:
    assert address_key(peername) == key


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, FD_LIMIT))


async def test_out_of_file_descriptors_refuses_logs_once_and_recovers(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    with (
        pg_server.fresh_database() as dsn,
        walcast_serve(
            dsn,
            tmp_path,
            preexec=_low_fd_limit,
            WALCAST_MAX_CONNECTIONS_PER_ADDRESS="0",  # the attack this test needs
            WALCAST_IDLE_TIMEOUT_SECONDS="60",
            WALCAST_HEADER_TIMEOUT_SECONDS="60",
        ) as node,
    ):
        held: list[asyncio.StreamWriter] = []

        async def one() -> None:
            with contextlib.suppress(OSError, TimeoutError):
                held.append((await asyncio.wait_for(_open(node), 5))[1])

        try:
            for _ in range(3):  # past the limit, three times over a few seconds
                await asyncio.gather(*(one() for _ in range(FD_LIMIT)))
                await asyncio.sleep(1.2)
            # Out of descriptors now: a newcomer is refused at once, not left in the backlog.
            try:
                reader, writer = await asyncio.wait_for(_open(node), 5)
            except TimeoutError:
                pytest.fail("a newcomer waits in a full backlog instead of being refused")
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: walcast\r\n\r\n")
            elapsed, answer = await _closed_after(reader, 5.0)
            writer.close()
            assert answer == b"" and elapsed < 2.5, (elapsed, answer[:100])
        finally:
            for writer in held:
                writer.close()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                if await _healthz(node, "127.0.0.1") == 200:
                    break
            assert time.monotonic() < deadline, "/healthz never came back"
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as r:
            metrics = await r.text()
    log = node.log_text()  # after a clean shutdown
    assert "Traceback" not in log, log[-3000:]
    assert f"file descriptor limit: {FD_LIMIT} (raised from 64" in log
    assert "accept() out of system resource" not in log
    lines = [line for line in log.splitlines() if "out of file descriptors" in line]
    assert 1 <= len(lines) <= 3, lines  # one now, one at shutdown for what was held back
    errors = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('walcast_accept_errors_total{reason="EMFILE"}')
    ]
    assert errors and errors[0] >= 1, metrics
