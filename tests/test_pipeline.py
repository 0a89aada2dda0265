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
from gateway.config import parse_realtime_config
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, running_gateway
from tests.pg import PostgresServer

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
