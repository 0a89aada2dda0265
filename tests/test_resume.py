"""Nothing lost, nothing doubled: resume with `since` after a dropped socket, a gateway crash
(kill -9) and a PostgreSQL restart; `resync_required` where history cannot reach back.

Every row carries a `seq` from one writer that commits in `seq` order, so "every committed
event exactly once, in order" is checked against the table itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from gateway.config import parse_realtime_config
from gateway.tickets import mint_ticket
from tests.fix_gateway import (
    ACCESS_TOKEN,
    Gateway,
    Socket,
    clean_env,
    free_port,
    running_gateway,
    signed_broadcast,
    walcast_command,
)
from tests.fix_serve import wait_ready
from tests.pg import PostgresServer

pytestmark = pytest.mark.integration

CONFIG = """
historySeconds = 120

[tables.items]
[tables.items.masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }

[tables.notes]
userColumn = "userId"
"""

SCHEMA = """
CREATE TABLE items (seq bigint PRIMARY KEY, "organizationId" text, ssn text);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE notes (seq bigint PRIMARY KEY, "organizationId" text, "userId" text);
ALTER TABLE notes REPLICA IDENTITY FULL;
"""

ORG = "org-r"


def _config(text: str = CONFIG) -> Any:
    return parse_realtime_config(tomllib.loads(text))


def _gateway(
    dsn: str, config_text: str = CONFIG
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    return running_gateway(dsn, config=_config(config_text), schema=SCHEMA)


def _ticket(user: str, roles: list[str], org: str = ORG) -> str:
    return mint_ticket(ACCESS_TOKEN, user_id=user, organization_id=org, roles=roles)


def _seqs(messages: list[dict[str, Any]], table: str = "items") -> list[int]:
    return [
        (m["new"] or m["old"])["seq"]
        for m in messages
        if m["type"] == "postgres_changes" and m["table"] == table
    ]


def _ready_index(sock: Socket, nth: int) -> int:
    readies = [i for i, m in enumerate(sock.messages) if m.get("event") == "ready"]
    return readies[nth]


async def test_resume_after_disconnect_replays_exactly_what_the_client_may_see(
    database_url: str,
) -> None:
    async with _gateway(database_url) as gw:
        first = await gw.connect_ticket(_ticket("rec", ["recruiter"]), ORG)
        gw.sql("INSERT INTO items VALUES (0, %s, '000-00-0000')", (ORG,))
        start = await first.wait_for(lambda m: m.get("table") == "items")
        await first.close()

        # While it is away: 50 transactions of 10 rows (a fifth in another organization, a
        # fifth user-targeted notes for someone else), and 20 broadcasts, 5 for other roles.
        expected: list[tuple[str, Any]] = []
        seq = 1
        with psycopg.connect(gw.dsn, autocommit=True) as conn:
            for tx in range(50):
                with conn.transaction():
                    for _ in range(10):
                        if seq % 5 == 0:
                            conn.execute("INSERT INTO items VALUES (%s, 'org-x', '1')", (seq,))
                        elif seq % 5 == 1:
                            conn.execute("INSERT INTO notes VALUES (%s, %s, 'someone')", (seq, ORG))
                        else:
                            conn.execute(
                                "INSERT INTO items VALUES (%s, %s, '123-45-6789')", (seq, ORG)
                            )
                            expected.append(("items", seq))
                        seq += 1
                if tx % 5 == 0:
                    for target in ([], ["owner"]):
                        event = f"b{tx}-{len(target)}"
                        body = {"organizationId": ORG, "event": event, "targetRoles": target}
                        conn.execute(
                            "SELECT pg_logical_emit_message(true, 'walcast', %s)",
                            (signed_broadcast(body),),
                        )
                        if not target:
                            expected.append(("broadcast", event))

        async def keep_writing() -> list[int]:
            written = []
            with psycopg.connect(gw.dsn, autocommit=True) as conn:
                for live in range(10_000, 10_040):
                    conn.execute("INSERT INTO items VALUES (%s, %s, '1')", (live, ORG))
                    written.append(live)
                    await asyncio.sleep(0.005)
            return written

        writer = asyncio.create_task(keep_writing())
        await asyncio.sleep(0.02)
        resumed = await gw.connect_ticket(_ticket("rec", ["recruiter"]), ORG, since=start["id"])
        written = await writer
        await resumed.wait_for(lambda m: (m.get("new") or {}).get("seq") == written[-1])

        ready_at = _ready_index(resumed, 0)
        replayed = resumed.messages[:ready_at]
        got = [
            ("items", m["new"]["seq"])
            if m["type"] == "postgres_changes"
            else ("broadcast", m["event"])
            for m in replayed
            if m["type"] != "system"
        ]
        # The replay is exactly the missed visible events, in commit order, then `ready`...
        replay_seqs = [s for kind, s in got if kind == "items"]
        assert got[: len(expected)] == expected
        live_during_replay = replay_seqs[len([e for e in expected if e[0] == "items"]) :]
        assert all(s >= 10_000 for s in live_during_replay)
        # ...masked as for a live recruiter...
        assert all(m["new"]["ssn"] != "123-45-6789" for m in replayed if m.get("table") == "items")
        # ...and the rows committed during the replay arrive once each, replay or live.
        all_seqs = _seqs(resumed.messages)
        assert sorted(s for s in all_seqs if s >= 10_000) == written
        assert len(all_seqs) == len(set(all_seqs))
        assert all_seqs == sorted(all_seqs)


async def test_resync_required_for_cursors_history_cannot_serve(database_url: str) -> None:
    short_history = CONFIG.replace("historySeconds = 120", "historySeconds = 1")
    async with _gateway(database_url, short_history) as gw:
        watcher = await gw.connect_ticket(_ticket("u", ["owner"]), ORG)
        gw.sql("INSERT INTO items VALUES (1, %s, 'x')", (ORG,))
        gw.sql("INSERT INTO items VALUES (2, %s, 'x')", (ORG,))
        old = await watcher.wait_for(lambda m: (m.get("new") or {}).get("seq") == 1)
        await watcher.wait_for(lambda m: (m.get("new") or {}).get("seq") == 2)
        await asyncio.sleep(2.5)  # history keeps events 1 s: both are gone by now
        gw.sql("INSERT INTO items VALUES (3, %s, 'x')", (ORG,))
        await watcher.wait_for(lambda m: (m.get("new") or {}).get("seq") == 3)

        for cursor in (old["id"], "garbage", "FFFFFFFFFFFFFFFF-0001", "", "0" * 5000):
            sock = await gw.connect_ticket(_ticket("u", ["owner"]), ORG, since=cursor)
            assert sock.messages[0]["event"] == "resync_required"
            assert sock.messages[1]["event"] == "ready"
        async with gw.http.get(f"{gw.url}/metrics") as response:
            assert "walcast_resyncs_total 5.0" in await response.text()


class _Writer:
    """Commits one row per transaction, in seq order, until stopped; survives server restarts."""

    def __init__(self, dsn: str, org: str = ORG) -> None:
        self.dsn, self.org = dsn, org
        self.committed: list[int] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seq = 1
        conn: psycopg.AsyncConnection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, connect_timeout=2
                    )
                await conn.execute("INSERT INTO items VALUES (%s, %s, '1')", (seq, self.org))
            except psycopg.Error:
                # Not committed (or unknown: the check below rereads the table).
                conn = None
                await asyncio.sleep(0.05)
                continue
            self.committed.append(seq)
            seq += 1
            await asyncio.sleep(0.004)
        if conn is not None:
            await conn.close()

    async def stop(self) -> list[int]:
        self._stop.set()
        await self.task
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT seq FROM items WHERE seq > 0 ORDER BY seq").fetchall()
        return [row[0] for row in rows]


async def _collect(url: str, ticket: str, since: str | None, into: list[dict[str, Any]]) -> None:
    """Read one socket until it closes, appending every message."""
    params = {"ws_ticket": ticket, "organizationId": ORG}
    if since:
        params["since"] = since
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/realtime/v1/websocket", params=params) as ws:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    into.append(orjson.loads(message.data))


def _last_cursor(messages: list[dict[str, Any]]) -> str | None:
    ids = [m["id"] for m in messages if "id" in m]
    return ids[-1] if ids else None


def _serve(dsn: str, port: int, config: Path) -> subprocess.Popen[bytes]:
    env = clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(config),
        WALCAST_PORT=str(port),
    )
    return subprocess.Popen([*walcast_command(), "serve"], env=env, stderr=subprocess.DEVNULL)


async def _wait_for_seq(messages: list[dict[str, Any]], seq: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while seq not in _seqs(messages):
        if time.monotonic() > deadline:
            raise AssertionError(f"seq {seq} never arrived; last {_seqs(messages)[-3:]}")
        await asyncio.sleep(0.05)


async def test_kill_9_and_restart_resumes_exactly_once(database_url: str, tmp_path: Path) -> None:
    config = tmp_path / "walcast.toml"
    config.write_text(CONFIG)
    # Schema and session tables first (the server checks them at start-up).
    gw_schema = psycopg.connect(database_url, autocommit=True)
    with gw_schema:
        gw_schema.execute(SCHEMA.encode())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(database_url, port, config)
    try:
        await wait_ready(url)
        writer = _Writer(database_url)
        before: list[dict[str, Any]] = []
        reading = asyncio.create_task(_collect(url, _ticket("k", ["owner"]), None, before))
        await _wait_for_seq(before, 30)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        await asyncio.wait_for(reading, 10)  # the socket dies with the process
        await asyncio.sleep(0.3)  # the writer keeps committing while walcast is down

        server = _serve(database_url, port, config)
        await wait_ready(url)
        after: list[dict[str, Any]] = []
        cursor = _last_cursor(before)
        reading = asyncio.create_task(_collect(url, _ticket("k", ["owner"]), cursor, after))
        await asyncio.sleep(0.3)
        committed = await writer.stop()
        await _wait_for_seq(after, committed[-1])
        assert not any(m.get("event") == "resync_required" for m in after)
        seqs = _seqs(before) + _seqs(after)
        assert seqs == committed  # every committed row once, in commit order
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()


async def test_postgres_restart_under_load_loses_nothing(
    pg_server: PostgresServer, database_url: str
) -> None:
    if not pg_server.can_restart:
        pytest.skip("the external test server cannot be restarted")
    async with _gateway(database_url) as gw:
        live = await gw.connect_ticket(_ticket("p", ["owner"]), ORG)
        writer = _Writer(gw.dsn)
        await live.wait_for(lambda m: (m.get("new") or {}).get("seq") == 20)
        await asyncio.to_thread(pg_server.restart, mode="immediate")
        await asyncio.sleep(0.5)
        # A second client drops off and resumes across the restart as well.
        cursor = _last_cursor(live.messages)
        cursor_seq = _seqs(live.messages)[-1]
        committed = await writer.stop()
        resumed = await gw.connect_ticket(_ticket("p", ["owner"]), ORG, since=cursor)
        gw.sql("INSERT INTO items VALUES (1000000, %s, 'last')", (ORG,))
        for sock in (live, resumed):
            await sock.wait_for(lambda m: (m.get("new") or {}).get("seq") == 1_000_000, 30)
        assert _seqs(live.messages) == [*committed, 1_000_000]
        assert _seqs(resumed.messages) == [s for s in committed if s > cursor_seq] + [1_000_000]
