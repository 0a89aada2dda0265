"""Large transactions: what one transaction of N rows costs `walcast serve` in memory and time.

    .venv/bin/python -m bench.large_transaction --rows 10000 100000 200000

For each size, a fresh `walcast serve` process (its own database and slot) with:

* a subscriber of the big transaction's organization, which parses every frame and checks
  that the rows arrive once each, in order;
* a socket of another organization that sends `ping` every 20 ms (its pongs should keep
  coming while the big transaction is delivered);
* a probe that asks `/healthz` every 20 ms;
* a sampler reading the server's resident memory (`VmRSS`) every 20 ms.

One `INSERT ... SELECT generate_series` commits N rows (the row shape of `bench.cdc_throughput`:
text, int, numeric, timestamptz, jsonb, bigint) for one organization, then one row is committed
for the other organization. Reported: the `/healthz` and pong latencies during the catch-up,
how long the N rows and the other organization's row took from their commits, and the server's
RSS before, at its peak, and once everything was delivered (history still holds the rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg

from bench.common import (
    add_common_args,
    database,
    emit,
    process_cpu_seconds,
    process_rss_bytes,
)
from gateway.tickets import mint_ticket

ACCESS_TOKEN = "bench-access-token-0123456789-abcdefghij"
BIG_ORG = "org-big"
OTHER_ORG = "org-other"
PROBE_SECONDS = 0.02

SCHEMA = """
CREATE TABLE bench_rows (
    id bigint PRIMARY KEY,
    "organizationId" text NOT NULL,
    label text NOT NULL,
    qty integer NOT NULL,
    price numeric(12, 2) NOT NULL,
    created timestamptz NOT NULL,
    attrs jsonb NOT NULL,
    counter bigint NOT NULL
);
ALTER TABLE bench_rows REPLICA IDENTITY FULL;
"""

CONFIG = """
historySeconds = 120

[tables.bench_rows]
"""

INSERT = """
INSERT INTO bench_rows
SELECT g, %(org)s,
       'item-' || g || '-' || md5(g::text),
       g %% 1000,
       (g %% 100000) / 100.0 + 0.25,
       now() - (g || ' seconds')::interval,
       jsonb_build_object('color', 'blue', 'size', g %% 7, 'tags', jsonb_build_array('a', 'b')),
       g::bigint * 1000003
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""


def insert_rows(dsn: str, org: str, first: int, last: int, insert: str = INSERT) -> float:
    """Commit rows `first..last` for `org` in one transaction; returns the commit time."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(insert, {"org": org, "first": first, "last": last})  # type: ignore[call-overload]
        return time.monotonic()


def _ticket(org: str) -> str:
    return mint_ticket(ACCESS_TOKEN, user_id=f"u-{org}", organization_id=org, roles=["member"])


class Subscriber(asyncio.Protocol):
    """A raw WebSocket client that parses every frame (RFC 6455 §5.2, unmasked server frames)
    and records the `id` of each row, so the order and the count can be checked cheaply."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = b""
        self.upgraded = False
        self.ids: list[int] = []
        self.last_at = 0.0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready = asyncio.Event()
        self.close_code: int | None = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def _pong(self, payload: bytes) -> None:
        """A pong (client frames are masked; a zero mask leaves the payload as it is)."""
        self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + bytes(4) + payload)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        ids = self.ids
        offset = 0
        size_all = len(buffer)
        while size_all - offset >= 2:
            opcode = buffer[offset] & 0x0F
            size, start = buffer[offset + 1] & 0x7F, offset + 2
            if size == 126:
                size, start = int.from_bytes(buffer[offset + 2 : offset + 4]), offset + 4
            elif size == 127:
                size, start = int.from_bytes(buffer[offset + 2 : offset + 10]), offset + 10
            if size_all < start + size:
                break
            payload = buffer[start : start + size]
            offset = start + size
            if opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
                continue
            if opcode == 0x9:  # the server's heartbeat: answer, or it closes the socket
                self._pong(payload)
                continue
            if opcode != 0x1:
                continue
            message = orjson.loads(payload)
            if message.get("type") == "postgres_changes":
                ids.append(message["new"]["id"])
            elif message.get("event") == "ready":
                self.ready.set()
        self.buffer = buffer[offset:]
        self.last_at = time.monotonic()
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.arrived.set()


async def open_subscriber(port: int, org: str) -> tuple[asyncio.Transport, Subscriber]:
    path = f"/realtime/v1/websocket?ws_ticket={_ticket(org)}&organizationId={org}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: Subscriber(request), "127.0.0.1", port
    )
    await asyncio.wait_for(protocol.ready.wait(), 10)
    return transport, protocol  # type: ignore[return-value]


class Probes:
    """`/healthz` every 20 ms, a pinging socket of another organization, RSS samples."""

    def __init__(self, url: str, pid: int, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.pid = pid
        self.http = http
        self.healthz: list[float] = []  #: request latencies, seconds
        self.pongs: list[float] = []  #: ping → pong latencies, seconds
        self.pong_at: list[float] = []  #: when each pong arrived
        self.rss: list[tuple[float, int]] = []
        self.other_ids: list[tuple[float, int]] = []  #: (arrival, id) on the other org's socket
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._tasks = [
            asyncio.create_task(self._probe_healthz()),
            asyncio.create_task(self._ping(ws)),
            asyncio.create_task(self._read(ws)),
            asyncio.create_task(self._sample_rss()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reset(self) -> None:
        self.healthz.clear()
        self.pongs.clear()
        self.pong_at.clear()

    async def _probe_healthz(self) -> None:
        while True:
            started = time.monotonic()
            async with self.http.get(f"{self.url}/healthz") as response:
                await response.read()
                assert response.status == 200
            self.healthz.append(time.monotonic() - started)
            await asyncio.sleep(PROBE_SECONDS)

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._sent: deque[float] = deque()
        while True:
            self._sent.append(time.monotonic())
            await ws.send_str("ping")
            await asyncio.sleep(PROBE_SECONDS)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            if message.data == "pong":
                self.pongs.append(now - self._sent.popleft())
                self.pong_at.append(now)
                continue
            parsed = orjson.loads(message.data)
            if parsed.get("type") == "postgres_changes":
                self.other_ids.append((now, parsed["new"]["id"]))

    async def _sample_rss(self) -> None:
        while True:
            self.rss.append((time.monotonic(), process_rss_bytes(self.pid)))
            await asyncio.sleep(PROBE_SECONDS)


def serve_env(dsn: str, port: int, config: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "ACCESS_TOKEN", "REDIS_URL")
        and not key.startswith(("WALCAST_", "PG"))
    }
    env.update(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(config),
        WALCAST_PORT=str(port),
        **extra,
    )
    return env


async def wait_ready(http: aiohttp.ClientSession, url: str, process: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"walcast serve exited with {process.returncode}")
        try:
            async with http.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("walcast serve did not become ready")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(
    dsn: str,
    rows: int,
    max_send_buffer: int | None = None,
    *,
    schema: str = SCHEMA,
    insert: str = INSERT,
) -> dict[str, Any]:
    """One run against a fresh database (`schema`: a `bench_rows` table; `insert`: the
    statement that commits rows `%(first)s..%(last)s` for `%(org)s`)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema.encode())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "walcast.toml"
        config.write_text(CONFIG)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        extra = {"WALCAST_MAX_SEND_BUFFER": str(max_send_buffer)} if max_send_buffer else {}
        # `-m walcast` from the current directory: run from another checkout to compare.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "walcast",
            "serve",
            env=serve_env(dsn, port, config, **extra),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with aiohttp.ClientSession() as http:
                await wait_ready(http, url, process)
                return await _run(dsn, url, port, process.pid, http, rows, insert)
        finally:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _run(
    dsn: str, url: str, port: int, pid: int, http: aiohttp.ClientSession, rows: int, insert: str
) -> dict[str, Any]:
    transport, subscriber = await open_subscriber(port, BIG_ORG)
    other = await http.ws_connect(
        f"{url}/realtime/v1/websocket",
        params={"ws_ticket": _ticket(OTHER_ORG), "organizationId": OTHER_ORG},
    )
    probes = Probes(url, pid, http)
    await probes.start(other)
    try:
        # Warm up: one small transaction through the whole path, so first-use costs (imports,
        # caches, the relation's types) are not counted.
        warm = 1000
        await asyncio.to_thread(insert_rows, dsn, BIG_ORG, 1, warm, insert)
        await _until(lambda: len(subscriber.ids) >= warm, 30)
        await asyncio.sleep(0.5)
        probes.reset()
        rss_before = process_rss_bytes(pid)
        cpu_before = process_cpu_seconds(pid)
        first, last = warm + 1, warm + rows
        started = time.monotonic()
        big_commit = await asyncio.to_thread(insert_rows, dsn, BIG_ORG, first, last, insert)
        other_commit = await asyncio.to_thread(
            insert_rows, dsn, OTHER_ORG, last + 1, last + 1, insert
        )
        await _until(lambda: bool(probes.other_ids) or subscriber.closed.done(), 60 + rows / 2000)
        await _until(lambda: subscriber.ids[-1] >= last or subscriber.closed.done(), 30)
        other_at = probes.other_ids[0][0] if probes.other_ids else float("nan")
        big_done = subscriber.last_at
        cpu = process_cpu_seconds(pid) - cpu_before
        await asyncio.sleep(0.5)
        rss_after = process_rss_bytes(pid)
    finally:
        await probes.stop()
        transport.close()
        await other.close()
    peak = max(rss for at, rss in probes.rss if at >= started)
    got = subscriber.ids[warm:]
    pong_gaps = [b - a for a, b in zip(probes.pong_at, probes.pong_at[1:], strict=False)]
    mib = 2**20
    return {
        "rows": rows,
        "insert_seconds": round(big_commit - started, 3),
        "delivered": len(got),
        "in_order_once": got == list(range(first, last + 1)),
        "subscriber_close_code": subscriber.close_code,
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_row": round(cpu / rows * 1e6, 1),
        "big_tx_delivered_after_commit_s": round(big_done - big_commit, 3),
        "other_org_event_after_its_commit_s": round(other_at - other_commit, 3),
        "healthz_max_ms": round(max(probes.healthz) * 1000, 1) if probes.healthz else None,
        "healthz_probes": len(probes.healthz),
        "pong_max_ms": round(max(probes.pongs) * 1000, 1) if probes.pongs else None,
        "pong_max_gap_ms": round(max(pong_gaps) * 1000, 1) if pong_gaps else None,
        "rss_before_mib": round(rss_before / mib, 1),
        "rss_peak_mib": round(peak / mib, 1),
        "rss_after_mib": round(rss_after / mib, 1),
        "rss_peak_delta_mib": round((peak - rss_before) / mib, 1),
        "rss_after_delta_mib": round((rss_after - rss_before) / mib, 1),
    }


async def _until(predicate: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {seconds}s")
        await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 200_000])
    parser.add_argument(
        "--max-send-buffer",
        type=int,
        help="WALCAST_MAX_SEND_BUFFER for the server (default: walcast's own)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    results = []
    with database(args.dsn) as dsn:
        for rows in args.rows:
            # Each size in a database (and server process) of its own.
            with psycopg.connect(dsn, autocommit=True) as conn:
                name = f"bigtx_{rows}_{os.getpid()}"
                conn.execute(f'CREATE DATABASE "{name}"')
            scratch = psycopg.conninfo.make_conninfo(dsn, dbname=name)
            try:
                results.append(asyncio.run(measure(scratch, rows, args.max_send_buffer)))
            finally:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    result = {"runs": results}
    summary = [
        f"{r['rows']:>7} rows: delivered {r['delivered']} (in order once: {r['in_order_once']}),"
        f" all {r['big_tx_delivered_after_commit_s']} s after commit; other org's event"
        f" {r['other_org_event_after_its_commit_s']} s; /healthz max {r['healthz_max_ms']} ms;"
        f" pong max {r['pong_max_ms']} ms; RSS {r['rss_before_mib']} → peak {r['rss_peak_mib']}"
        f" → {r['rss_after_mib']} MiB"
        for r in results
    ]
    emit("large_transaction", result, summary, json_only=args.json_only)
    return result


if __name__ == "__main__":
    main()
