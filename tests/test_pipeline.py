"""walcast.pipeline against a real PostgreSQL: history held back never holds the server hostage.

The slot's confirmed position stays `historySeconds` behind on purpose (a restarted node re-reads
its window). A walsender that is shutting down waits until the client has reported receiving all
it sent; walcast reports that with an invalid flush position, so `pg_ctl stop -m fast` finishes
in seconds while the slot stays where history needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
from typing import Any

import psycopg
import pytest

from cdc import catalog
from cdc.lsn import parse_lsn
from gateway.config import Settings, parse_realtime_config
from gateway.metrics import Metrics
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, running_gateway
from tests.pg import PostgresServer
from walcast.aio import cancel_and_wait
from walcast.pipeline import DropSink, Pipeline

pytestmark = pytest.mark.integration

CONFIG = """
historySeconds = 120

[tables.items]
"""

SCHEMA = """
CREATE TABLE items (seq bigint PRIMARY KEY, "organizationId" text);
ALTER TABLE items REPLICA IDENTITY FULL;
"""

ORG = "org-stop"
FAST_STOP_SECONDS = 8.0
"""A fast shutdown (and the start after it) takes about a second; blocked, it never ends."""


def _seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["new"]["seq"] for m in messages if m["type"] == "postgres_changes"]


def _ticket() -> str:
    """A ticket is good for one socket."""
    return mint_ticket(ACCESS_TOKEN, user_id="u", organization_id=ORG, roles=["owner"])


def _insert(dsn: str, seqs: range) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for seq in seqs:
            conn.execute("INSERT INTO items VALUES (%s, %s)", (seq, ORG))


async def _confirmed(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        status = await catalog.slot_status(conn, "walcast")
    assert status is not None and status.confirmed_flush_lsn is not None
    return status.confirmed_flush_lsn


async def test_fast_shutdown_completes_while_walcast_streams(
    pg_server: PostgresServer, database_url: str
) -> None:
    if not pg_server.can_restart:
        pytest.skip("the test server cannot be restarted")
    config = parse_realtime_config(tomllib.loads(CONFIG))
    restart: asyncio.Future[None] | None = None
    try:
        async with running_gateway(database_url, config=config, schema=SCHEMA) as gw:
            live = await gw.connect_ticket(_ticket(), ORG)
            _insert(database_url, range(1, 21))
            await live.wait_for(lambda m: (m.get("new") or {}).get("seq") == 20)
            cursor = next(m["id"] for m in live.messages if (m.get("new") or {}).get("seq") == 10)
            held = await _confirmed(database_url)
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                assert held < await catalog.current_wal_lsn(conn)  # history holds the slot

            started = time.monotonic()
            restart = asyncio.ensure_future(asyncio.to_thread(pg_server.restart, mode="fast"))
            await asyncio.wait({restart}, timeout=FAST_STOP_SECONDS)
            assert restart.done(), f"pg_ctl stop -m fast still waits after {FAST_STOP_SECONDS}s"
            restart.result()
            print(f"pg_ctl restart -m fast took {time.monotonic() - started:.2f}s")
            assert await _confirmed(database_url) == held  # the slot did not move

            _insert(database_url, range(21, 31))
            resumed = await gw.connect_ticket(_ticket(), ORG, since=cursor)
            for sock in (live, resumed):
                await sock.wait_for(lambda m: (m.get("new") or {}).get("seq") == 30, 30)
            assert _seqs(live.messages) == list(range(1, 31))  # nothing lost, nothing twice
            assert _seqs(resumed.messages) == list(range(11, 31))
            assert not any(m.get("event") == "resync_required" for m in resumed.messages)
    finally:
        if restart is not None:  # with walcast gone a blocked stop completes: let it restart
            with contextlib.suppress(Exception):
                await restart


class _Positions(DropSink):
    """Records what the pipeline marks as published."""

    def __init__(self) -> None:
        self.marked: list[int] = []

    def mark_position(self, commit_lsn: int) -> None:
        self.marked.append(commit_lsn)


async def test_ready_comes_with_a_position_past_everything_before_start_up(
    database_url: str,
) -> None:
    """A socket may attach the moment the node is ready, before the sync marker's commit has
    been read: the position it is told (its ``ready`` cursor) must already cover everything
    committed before start-up, or resuming from it answers ``resync_required``."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    settings = Settings(database_url=database_url, access_tokens=(ACCESS_TOKEN,))
    sink = _Positions()
    at_ready: list[list[int]] = []
    ready = asyncio.Event()

    def on_ready(start_lsn: int) -> None:
        at_ready.append(list(sink.marked))
        ready.set()

    metrics = Metrics()
    pipeline = Pipeline(
        settings, parse_realtime_config(tomllib.loads(CONFIG)), sink, metrics, on_ready=on_ready
    )
    start_lsn = await pipeline.prepare()
    _insert(database_url, range(1, 4))  # committed before start-up, after the slot
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    before_start = parse_lsn(row[0])
    task = asyncio.create_task(pipeline.run(start_lsn))
    try:
        await asyncio.wait_for(ready.wait(), 30)
    finally:
        await cancel_and_wait(task)
    assert at_ready[0] and max(at_ready[0]) > before_start  # the marker, written after
    # The three rows re-read on the way to ready were counted, labelled when scraped.
    assert metrics.changes.counts == {("public", "items", "INSERT"): 3}
    assert b'walcast_changes_total{kind="INSERT",table="public.items"} 3.0' in metrics.render()
