"""Attacks on resumes and slow consumers: one member must not stall every organization, and a
socket that never reads must not cost the server more than about twice its send buffer.

(a) Several concurrent ``since=`` resumes over a large history, against a real `walcast serve`:
    ``/healthz`` and another organization's live events keep answering within 250 ms, and each
    resume still gets every event.
(b) Never-reading sockets (tiny receive buffer), live and resuming, against a real `walcast
    serve`: the server's RSS grows by less than 2.5 x ``WALCAST_MAX_SEND_BUFFER`` per socket, and
    each is closed as a slow consumer (1013).
(c) A resume that yields (its replay waits for the socket to drain) still delivers every event
    exactly once and in order while live events arrive, and a revocation committed during the
    replay closes the socket with 4403 and nothing committed after it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from gateway.config import parse_realtime_config
from gateway.protocol import CloseCode
from gateway.state import STATE
from gateway.tickets import mint_ticket
from tests.fix_gateway import (
    ACCESS_TOKEN,
    Gateway,
    clean_env,
    free_port,
    running_gateway,
    walcast_command,
)
from tests.fix_rawws import close_codes, frames, read_to_end, stalled_socket
from tests.fix_serve import prepare_database, stop_process, wait_ready

pytestmark = pytest.mark.integration

WS = "/realtime/v1/websocket"
ORG, OTHER = "org-big", "org-bystander"

CONFIG = """
historySeconds = 120

[tables.items]
[tables.items.masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
"""

SCHEMA = """
CREATE TABLE items (seq bigint PRIMARY KEY, "organizationId" text, ssn text, body text);
ALTER TABLE items REPLICA IDENTITY FULL;
"""


def _ticket(user: str, org: str = ORG, roles: tuple[str, ...] = ("recruiter",)) -> str:
    return mint_ticket(ACCESS_TOKEN, user_id=user, organization_id=org, roles=list(roles))


def _insert_rows(dsn: str, first: int, count: int, org: str, body_bytes: int) -> None:
    """`count` rows from seq `first` in one transaction, each with a `body_bytes` text body."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items SELECT s, %s, '123-45-6789', repeat('x', %s)"
            " FROM generate_series(%s::bigint, %s::bigint) AS s",
            (org, body_bytes, first, first + count - 1),
        )


# -- a real `walcast serve` ------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def _status(self, field: str) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
        assert match is not None
        return int(match.group(1)) * 1024

    @property
    def rss(self) -> int:
        """The server process's resident set size, bytes."""
        return self._status("VmRSS")

    def peak_since_reset(self) -> int:
        """The highest RSS since `reset_peak` (kept by the kernel: no peak is missed)."""
        return self._status("VmHWM")

    def reset_peak(self) -> int:
        """Start a new peak from the current RSS, which is returned."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self.rss

    async def metric(self, http: aiohttp.ClientSession, name: str) -> float:
        async with http.get(f"{self.url}/metrics") as response:
            text = await response.text()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen([*walcast_command(), "serve"], env=clean_env(**env), stderr=stderr)


@contextlib.asynccontextmanager
async def _serve(dsn: str, tmp_path: Path, **env: str) -> AsyncIterator[Server]:
    config = prepare_database(dsn, tmp_path, schema=SCHEMA, config=CONFIG)
    port = free_port()
    values = {
        "DATABASE_URL": dsn,
        "ACCESS_TOKEN": ACCESS_TOKEN,
        "WALCAST_CONFIG": str(config),
        "WALCAST_PORT": str(port),
        **env,
    }
    log = tmp_path / "serve.log"
    process = _spawn(values, log)
    server = Server(f"http://127.0.0.1:{port}", port, process)
    try:
        await wait_ready(server.url, process=process, log=log)
        yield server
    finally:
        stop_process(process)


async def _ready_cursor(http: aiohttp.ClientSession, url: str, org: str = ORG) -> str:
    """The cursor a fresh socket is told in `ready`: every event after it is still to come."""
    params = {"ws_ticket": _ticket("cursor", org), "organizationId": org}
    async with http.ws_connect(f"{url}{WS}", params=params) as ws:
        message = await ws.receive_json(timeout=10)
    assert message["event"] == "ready", message
    return str(message["payload"]["cursor"])


class LiveProbe:
    """A socket of another organization that timestamps each row it receives, by seq."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.arrived: dict[int, float] = {}
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                body = orjson.loads(message.data)
                if body.get("type") == "postgres_changes":
                    self.arrived[body["new"]["seq"]] = time.monotonic()
                    self._changed.set()

    async def wait_for(self, seq: int, timeout: float = 10.0) -> float:
        async with asyncio.timeout(timeout):
            while seq not in self.arrived:
                self._changed.clear()
                await self._changed.wait()
        return self.arrived[seq]


# -- (a) concurrent resumes do not stall the node ---------------------------------------------

HISTORY = 20_000
RESUMES = 6
LATENCY_BOUND = 0.25


def _resume_all(url: str, cursor: str) -> list[list[str]]:
    """In a thread of its own (so that reading 120k frames does not delay the probes): resume
    `RESUMES` sockets concurrently from `cursor`, each read until `ready`."""

    async def one(http: aiohttp.ClientSession, index: int) -> list[str]:
        params = {"ws_ticket": _ticket(f"resumer{index}"), "organizationId": ORG, "since": cursor}
        frames: list[str] = []
        async with http.ws_connect(f"{url}{WS}", params=params, max_msg_size=0) as ws:
            async for message in ws:
                assert message.type is aiohttp.WSMsgType.TEXT, (message, len(frames))
                frames.append(message.data)
                if '"event":"ready"' in message.data:
                    break
        return frames

    async def run() -> list[list[str]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            return await asyncio.wait_for(
                asyncio.gather(*(one(http, i) for i in range(RESUMES))), 60
            )

    return asyncio.run(run())


async def test_concurrent_resumes_over_a_large_history_do_not_stall_the_node(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        _serve(database_url, tmp_path) as server,
        aiohttp.ClientSession() as http,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db,
    ):
        cursor = await _ready_cursor(http, server.url)
        probe_ws = await http.ws_connect(
            f"{server.url}{WS}", params={"ws_ticket": _ticket("probe", OTHER)}
        )
        probe = LiveProbe(probe_ws)
        _insert_rows(database_url, 1, HISTORY, ORG, 200)
        seq = 10_000_000  # the bystander organization's rows; the sentinel first
        await db.execute("INSERT INTO items VALUES (%s, %s, '1', '')", (seq, OTHER))
        await probe.wait_for(seq, 30)  # commit order: the history is in place

        resumes = asyncio.create_task(asyncio.to_thread(_resume_all, server.url, cursor))
        healthz: list[float] = []
        live: list[float] = []

        async def health_probe() -> None:
            while not resumes.done():
                started = time.monotonic()
                async with http.get(f"{server.url}/healthz") as response:
                    assert response.status == 200
                healthz.append(time.monotonic() - started)
                await asyncio.sleep(0.02)

        async def live_probe() -> None:
            nonlocal seq
            while not resumes.done():
                seq += 1
                started = time.monotonic()
                await db.execute("INSERT INTO items VALUES (%s, %s, '1', '')", (seq, OTHER))
                live.append(await probe.wait_for(seq) - started)
                await asyncio.sleep(0.03)

        await asyncio.gather(health_probe(), live_probe(), resumes)
        await probe_ws.close()

        for frames in resumes.result():
            events = [orjson.loads(frame) for frame in frames]
            seqs = [e["new"]["seq"] for e in events if e["type"] == "postgres_changes"]
            assert seqs == list(range(1, HISTORY + 1))  # every event once, in order...
            assert events[-1]["event"] == "ready"  # ...then ready
            assert all(e["new"]["ssn"] == "*****6789" for e in events[:-1])
        print(
            f"resumes {RESUMES} x {HISTORY}: /healthz max {max(healthz) * 1000:.0f} ms"
            f" ({len(healthz)} probes), other org's event max {max(live) * 1000:.0f} ms"
            f" ({len(live)} probes), RSS {server.rss / 2**20:.0f} MB"
        )
        assert max(healthz) < LATENCY_BOUND
        assert max(live) < LATENCY_BOUND


# -- (b) never-reading sockets stay within about twice their send buffer ----------------------

#: 1 MiB: a socket also costs a fixed few hundred KB (aiohttp's and asyncio's objects, the
#: allocator), which at a smaller buffer would dominate the ratio this test is about (measured:
#: 2.8-3.2 x at 256 KiB, 1.3 x at 1 MiB; before the bound, 11 x at 256 KiB).
SEND_BUFFER = 1024 * 1024
STALLED = 20  #: half live, half resuming from before the history
RSS_BOUND_PER_SOCKET = 2.5 * SEND_BUFFER


async def _stalled(port: int, *, since: str | None = None) -> socket.socket:
    return await stalled_socket(port, _ticket("stalled", ORG), ORG, since=since)


async def _drain(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """Read a raw socket to its end (or a reset); None if the server keeps it open."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # the server waits 2 s at most
    try:
        return await read_to_end(sock, timeout)
    except TimeoutError:
        return None


async def test_never_reading_sockets_cost_at_most_about_twice_the_send_buffer(
    database_url: str, tmp_path: Path
) -> None:
    """What the node keeps whatever its sockets (history, one frame per class) is measured
    first: the same transaction, published once to a reading socket only. What the attack adds
    beyond that, per never-reading socket, must stay under 2.5 x the buffer."""
    env = {"WALCAST_MAX_SEND_BUFFER": str(SEND_BUFFER), "WALCAST_REPLAY_STALL_SECONDS": "1"}
    async with _serve(database_url, tmp_path, **env) as server, aiohttp.ClientSession() as http:
        cursor = await _ready_cursor(http, server.url)
        reader = await http.ws_connect(
            f"{server.url}{WS}", params={"ws_ticket": _ticket("reader")}, max_msg_size=0
        )
        probe = LiveProbe(reader)
        # A history of 8 x the buffer to resume from, in transactions of 100 rows.
        for first in range(1, 2001, 100):
            _insert_rows(database_url, first, 100, ORG, 1000)
        await probe.wait_for(2000, 30)

        async def publish(first: int) -> None:
            """16 x the buffer in one transaction (one write pass)."""
            _insert_rows(database_url, first, 4000, ORG, 1000)
            await probe.wait_for(first + 3999, 30)
            await asyncio.sleep(0.5)

        await asyncio.sleep(0.5)
        before_control = server.reset_peak()
        await publish(10_001)
        kept = server.peak_since_reset() - before_control
        baseline = server.reset_peak()
        sockets = [await _stalled(server.port) for _ in range(STALLED // 2)]
        sockets += [await _stalled(server.port, since=cursor) for _ in range(STALLED // 2)]
        await publish(20_001)
        deadline = time.monotonic() + 20
        while await server.metric(http, "walcast_slow_consumers_total") < STALLED:
            if time.monotonic() > deadline:
                break  # asserted below, once the figures are printed
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        peak = server.peak_since_reset()
        streams = await asyncio.gather(*(_drain(sock) for sock in sockets))
        for sock in sockets:
            sock.close()
        growth = (peak - baseline - kept) / STALLED
        print(
            f"{STALLED} never-reading sockets, buffer {SEND_BUFFER // 1024} KiB: RSS"
            f" {baseline / 2**20:.0f} -> {peak / 2**20:.0f} MB (the node's own share"
            f" {kept / 2**20:.0f} MB), {growth / 1024:.0f} KiB per socket"
            f" ({growth / SEND_BUFFER:.2f} x the buffer)"
        )
        assert growth < RSS_BOUND_PER_SOCKET
        assert await server.metric(http, "walcast_slow_consumers_total") == STALLED
        assert await server.metric(http, "walcast_connections") == 1  # only the reader
        assert None not in streams  # the server closed every one of them...
        for stream in streams:  # ...and where the close frame got through, it says 1013
            assert stream is not None
            assert close_codes(stream) in ([], [CloseCode.TRY_AGAIN_LATER])
        # The reading socket got everything.
        expected = [*range(1, 2001), *range(10_001, 14_001), *range(20_001, 24_001)]
        assert sorted(probe.arrived) == expected
        await reader.close()


# -- (c) a yielding resume: exactly once, in order; revocation mid-replay ---------------------


def _config() -> Any:
    return parse_realtime_config(tomllib.loads(CONFIG))


async def _until_held(gw: Gateway, events: int) -> None:
    """Wait until the node's history holds `events` events (the reader has caught up)."""
    history = gw.app[STATE].registry.history
    deadline = time.monotonic() + 30
    while len(history) < events:
        assert time.monotonic() < deadline, f"the history holds {len(history)} events"
        await asyncio.sleep(0.02)


async def test_a_yielding_resume_delivers_every_event_once_in_order_with_live_traffic(
    database_url: str,
) -> None:
    async with running_gateway(
        database_url, config=_config(), schema=SCHEMA, max_send_buffer=64 * 1024
    ) as gw:
        start = await gw.connect_ticket(_ticket("u"), ORG)
        cursor = start.messages[-1]["payload"]["cursor"]
        await start.close()
        _insert_rows(gw.dsn, 1, 5000, ORG, 200)  # about 20 x the send buffer
        await _until_held(gw, 5000)
        committed = list(range(1, 5001))
        stop = threading.Event()

        def keep_writing() -> None:
            with psycopg.connect(gw.dsn, autocommit=True) as conn:
                seq = 100_000
                while not stop.is_set():
                    conn.execute("INSERT INTO items VALUES (%s, %s, '1', '')", (seq, ORG))
                    committed.append(seq)
                    seq += 1
                    time.sleep(0.002)

        writer = asyncio.create_task(asyncio.to_thread(keep_writing))
        await asyncio.sleep(0.05)
        resumed = await gw.connect_ticket(_ticket("u"), ORG, since=cursor)
        await asyncio.sleep(0.1)
        stop.set()
        await writer
        await resumed.wait_for(lambda m: (m.get("new") or {}).get("seq") == committed[-1])
        seqs = [m["new"]["seq"] for m in resumed.messages if m["type"] == "postgres_changes"]
        assert seqs == committed  # no gap, no duplicate, commit order
        ready = next(i for i, m in enumerate(resumed.messages) if m.get("event") == "ready")
        before_ready = [m["new"]["seq"] for m in resumed.messages[:ready] if "new" in m]
        # The replay yielded: rows committed while it ran came before `ready`, once.
        assert any(seq >= 100_000 for seq in before_ready)


async def test_a_revocation_during_a_replay_closes_it_with_4403_and_nothing_after(
    database_url: str,
) -> None:
    async with running_gateway(
        database_url, config=_config(), schema=SCHEMA, max_send_buffer=64 * 1024
    ) as gw:
        token = gw.add_member("boss", ORG, "owner")
        start = await gw.connect(token, ORG)
        cursor = start.messages[-1]["payload"]["cursor"]
        await start.close()
        _insert_rows(gw.dsn, 1, 5000, ORG, 2000)  # 10 MB: more than the kernel's buffers take
        await _until_held(gw, 5000)
        port = int(gw.url.rsplit(":", 1)[1])
        # A resume that reads nothing for now.
        sock = await stalled_socket(port, await gw.ticket(token, ORG), ORG, since=cursor)
        await asyncio.sleep(0.3)  # the replay has filled the socket's buffer and waits
        gw.sql(
            "BEGIN;"
            " UPDATE member SET role = 'recruiter' WHERE \"userId\" = 'boss';"
            " INSERT INTO items VALUES (99999, 'org-big', 'raw-after-revoke', '');"
            " COMMIT;"
        )
        stream = await _drain(sock)
        sock.close()
        assert stream is not None
        texts = [orjson.loads(payload) for opcode, payload in frames(stream) if opcode == 0x1]
        closes = close_codes(stream)
        seqs = [t["new"]["seq"] for t in texts if t["type"] == "postgres_changes"]
        assert seqs == list(range(1, len(seqs) + 1))  # part of the replay, in order
        assert len(seqs) < 5000  # ...cut short:
        assert texts[-1].get("event") == "auth:token-invalidated", (texts[-1], len(seqs), closes)
        assert closes == [CloseCode.ACCESS_REVOKED]
        assert not any(t.get("event") == "ready" for t in texts)
        assert b"raw-after-revoke" not in stream
