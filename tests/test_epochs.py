"""History epochs: every history belongs to one database, and cursors carry the epoch.

Unit tests for the cursor format, the epoch id and the Redis continuation rule; integration
tests (real PostgreSQL, real Redis) for what users hit: walcast on the Redis bus started
against a Redis that holds another database's history, a cursor taken to another database,
a restart of the same database (no resync), and a slot PostgreSQL invalidated
(`max_slot_wal_keep_size`) while walcast was stopped — on a cluster of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tomllib
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from cdc.cursors import NO_EPOCH, cursor_key, format_cursor, is_epoch, parse_cursor
from cdc.identity import Identity
from gateway.config import parse_realtime_config
from gateway.state import STATE
from gateway.tickets import mint_ticket
from tests.fix_gateway import ACCESS_TOKEN, Gateway, Socket, running_gateway
from tests.pg import PostgresServer, running_postgres
from walcast.bus.app import FEED
from walcast.bus.epoch import EpochRecord, decide

EPOCH = "9f2c41ab"
OTHER = "0123abcd"

# -- the cursor format -------------------------------------------------------------------------

lsns = st.integers(0, 2**64 - 1)
positions = st.integers(0, 2**64 - 1)
epochs = st.text("0123456789abcdef", min_size=8, max_size=8)


@given(lsns, positions, epochs)
def test_a_cursor_round_trips_within_its_epoch(lsn: int, position: int, epoch: str) -> None:
    text = format_cursor(lsn, position, epoch)
    assert parse_cursor(text, epoch) == (lsn, position)
    assert cursor_key(text) == (lsn, position)


@given(lsns, positions, lsns, positions, epochs)
def test_string_order_is_commit_order_within_an_epoch(
    lsn_a: int, pos_a: int, lsn_b: int, pos_b: int, epoch: str
) -> None:
    a, b = format_cursor(lsn_a, pos_a, epoch), format_cursor(lsn_b, pos_b, epoch)
    assert (a < b) == ((lsn_a, pos_a) < (lsn_b, pos_b))
    assert (a == b) == ((lsn_a, pos_a) == (lsn_b, pos_b))


def test_the_format() -> None:
    assert format_cursor(0x16B3748, 3, EPOCH) == "00000000016B3748-0003-9f2c41ab"
    assert format_cursor(1, 0xFFFF, EPOCH) == "0000000000000001-FFFF0000000000000000-9f2c41ab"
    assert format_cursor(0x16B3748, 3) == "00000000016B3748-0003"  # no epoch: the old format
    assert is_epoch(EPOCH) and not is_epoch(NO_EPOCH) and not is_epoch("9F2C41AB")


@pytest.mark.parametrize(
    "text",
    [
        "00000000016B3748-0003-0123abcd",  # another epoch
        "00000000016B3748-0003",  # the old format: no epoch
        "00000000016B3748-0003-",
        "00000000016B3748-0003-9F2C41AB",  # the epoch is lowercase
        "00000000016B3748-0003-9f2c41ab0",
        "00000000016B3748-0003-9f2c41a",
        "00000000016b3748-0003-9f2c41ab",  # the LSN is uppercase
        "16B3748-0003-9f2c41ab",
        "00000000016B3748-FFFF-9f2c41ab",  # FFFF always starts the wide form
        "",
        "garbage",
        "0" * 5000,
        " 00000000016B3748-0003-9f2c41ab",
        "00000000016B3748-0003-9f2c41ab\n",
    ],
)
def test_another_epoch_the_old_format_and_garbage_are_not_cursors_of_this_epoch(
    text: str,
) -> None:
    assert parse_cursor(text, EPOCH) is None


def test_the_old_format_is_read_only_as_the_old_format() -> None:
    assert parse_cursor("00000000016B3748-0003", NO_EPOCH) == (0x16B3748, 3)
    assert parse_cursor("00000000016B3748-0003-9f2c41ab", NO_EPOCH) is None


@given(st.one_of(st.text(), st.text("0123456789ABCDEFabcdef-", max_size=60)), epochs)
def test_parsing_never_raises(text: str, epoch: str) -> None:
    key = parse_cursor(text, epoch)
    assert key is None or (isinstance(key, tuple) and text.endswith(epoch))
    assert cursor_key(text) is None or key is None or cursor_key(text) == key


# -- the epoch id ------------------------------------------------------------------------------

IDENTITY = Identity("7300000000000000001", 1, "app", 16384, "walcast")


def test_the_epoch_id_is_stable_for_the_same_identity_and_differs_otherwise() -> None:
    same = Identity("7300000000000000001", 1, "app", 16384, "walcast")
    assert IDENTITY.epoch() == same.epoch() and is_epoch(IDENTITY.epoch())
    others = [
        Identity("7300000000000000002", 1, "app", 16384, "walcast"),
        Identity("7300000000000000001", 2, "app", 16384, "walcast"),
        Identity("7300000000000000001", 1, "app2", 16384, "walcast"),
        Identity("7300000000000000001", 1, "app", 16385, "walcast"),
        Identity("7300000000000000001", 1, "app", 16384, "other"),
    ]
    ids = {IDENTITY.epoch(), *(other.epoch() for other in others), IDENTITY.epoch(0x16B3748)}
    assert len(ids) == 7
    assert Identity.from_fields(IDENTITY.as_fields()) == IDENTITY
    assert Identity.from_fields({"system": "1"}) is None
    assert others[1].differences(IDENTITY) == ["timeline: 1 → 2"]


# -- the Redis continuation rule ---------------------------------------------------------------

OWN = IDENTITY.epoch()
RECORD = EpochRecord("1-0", OWN, IDENTITY)
OTHER_DB = Identity("7300000000000000099", 1, "app", 16384, "walcast")
F, P, WAL = (0x1000, 0), (0x5000, 3), 0x9000

CASES = [
    # record, floor, position, identity, slot position, new?, epoch, reason contains
    (None, None, None, IDENTITY, 0x1000, True, OWN, ""),  # a fresh Redis
    (None, F, P, IDENTITY, 0x1000, True, OWN, "without an epoch"),
    (RECORD, F, P, IDENTITY, 0x2000, False, OWN, ""),  # a restart: go on
    (RECORD, F, P, IDENTITY, 0x5000, False, OWN, ""),
    (RECORD, F, None, IDENTITY, 0x1000, False, OWN, ""),  # nothing published yet
    (RECORD, None, None, IDENTITY, 0x3000, False, OWN, ""),  # lost the data: rebuild
    (RECORD, F, P, OTHER_DB, 0x2000, True, OTHER_DB.epoch(), "system identifier"),
    (RECORD, F, P, IDENTITY, 0x0800, True, IDENTITY.epoch(0x0800), "restored"),
    (RECORD, F, P, IDENTITY, 0x6000, True, IDENTITY.epoch(0x6000), "re-created"),
    (RECORD._replace(identity=None), F, P, IDENTITY, 0x2000, True, "", "cannot read"),
]


@pytest.mark.parametrize(
    ("record", "floor", "position", "identity", "start", "new", "epoch", "reason"), CASES
)
def test_the_history_goes_on_only_for_the_same_database_and_slot(
    record: EpochRecord | None,
    floor: Any,
    position: Any,
    identity: Identity,
    start: int,
    new: bool,
    epoch: str,
    reason: str,
) -> None:
    decision = decide(record, floor, position, identity, start, WAL)
    assert decision.new == new
    if epoch:
        assert decision.epoch == epoch
    assert reason in decision.reason and bool(decision.reason) == bool(reason)
    if new and record is not None:
        assert decision.epoch != record.epoch  # never the id of the history it replaces


def test_a_history_past_the_servers_wal_is_from_a_restored_backup() -> None:
    decision = decide(RECORD, F, P, IDENTITY, 0x2000, wal_end=0x4000)
    assert decision.new and "restored" in decision.reason


# -- integration -------------------------------------------------------------------------------

CONFIG = """
historySeconds = 120

[tables.items]
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (seq bigint PRIMARY KEY, "organizationId" text NOT NULL);
ALTER TABLE items REPLICA IDENTITY FULL;
"""
ORG = "org-e"


def _gateway(dsn: str, **settings: Any) -> contextlib.AbstractAsyncContextManager[Gateway]:
    config = parse_realtime_config(tomllib.loads(CONFIG))
    return running_gateway(dsn, config=config, schema=SCHEMA, **settings)


async def _socket(gw: Gateway, since: str | None = None) -> Socket:
    """Connect as a client does: a fresh ticket per attempt, and another attempt after a 401
    or 503 — a node that has just switched epochs refuses tickets minted before the switch."""
    for attempt in range(20):
        ticket = mint_ticket(ACCESS_TOKEN, user_id="u", organization_id=ORG, roles=["owner"])
        try:
            return await gw.connect_ticket(ticket, ORG, since=since)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status not in (401, 503) or attempt == 19:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


def _insert(dsn: str, seqs: range) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for seq in seqs:
            conn.execute("INSERT INTO items VALUES (%s, %s)", (seq, ORG))


def _seqs(sock: Socket) -> list[int]:
    return [m["new"]["seq"] for m in sock.events() if m.get("table") == "items"]


async def _wait_seqs(sock: Socket, last: int) -> None:
    await sock.wait_for(lambda m: m.get("table") == "items" and m["new"]["seq"] == last, 30)


def _resynced(sock: Socket) -> bool:
    return sock.messages[0].get("event") == "resync_required"


def _slot() -> dict[str, str]:
    name = f"e_{uuid.uuid4().hex[:12]}"
    return {"slot": name, "publication": name}


def _wal_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def small_wal_cluster() -> Iterator[PostgresServer]:
    """A cluster of its own that keeps at most 1 MB of WAL for a slot, so the tests can
    invalidate slots (and whose WAL positions are not the session cluster's)."""
    if os.environ.get("WALCAST_TEST_DATABASE_URL"):
        pytest.skip("needs a cluster of its own (an external test server is used as it is)")
    with running_postgres({"max_slot_wal_keep_size": "1MB"}) as server:
        yield server


@pytest.fixture
def small_wal_database(small_wal_cluster: PostgresServer) -> Iterator[str]:
    with small_wal_cluster.fresh_database() as dsn:
        yield dsn


@pytest.fixture
def prefix(redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's own Redis key prefix, in the environment the gateways it starts read."""
    monkeypatch.setenv("WALCAST_REDIS_PREFIX", redis_prefix)
    return redis_prefix


integration = pytest.mark.integration


async def _until_epoch_changes(gw: Gateway, old: str) -> None:
    """Wait until the node serves the history the reader started (it may have read the one
    left in Redis first, and then closes its sockets when the reader starts a new epoch)."""
    feed = gw.app[FEED]
    for _ in range(600):
        if feed.epoch not in (old, NO_EPOCH):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the node still serves epoch {feed.epoch!r}")


def _epoch_of(cursor: str) -> str:
    return cursor.rsplit("-", 1)[1]


@integration
async def test_redis_bus_on_a_redis_holding_another_databases_history_delivers_every_row(
    database_url: str,
    small_wal_database: str,
    redis_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that outlived its database: the new database's WAL positions are all below the
    stored history's, which once made the reader skip every transaction as "already stored"."""
    new_cluster_lsn = _wal_lsn(small_wal_database)
    with psycopg.connect(database_url, autocommit=True) as conn:
        while _wal_lsn(database_url) < new_cluster_lsn + (64 << 20):
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("SELECT pg_logical_emit_message(false, 'x', 'x')")
    slot = _slot()
    async with _gateway(database_url, redis_url=redis_url, **slot) as gw:
        sock = await _socket(gw)
        _insert(database_url, range(1, 4))
        await _wait_seqs(sock, 3)
        old_cursor = sock.events()[-1]["id"]
    client = aioredis.Redis.from_url(redis_url)
    stored = await client.get(f"{prefix}position")
    await client.aclose()
    assert stored is not None  # a history is left behind, ahead of every new position
    stored_key = cursor_key(stored.decode())
    assert stored_key is not None and stored_key[0] > _wal_lsn(small_wal_database)

    caplog.set_level(logging.INFO)
    async with _gateway(small_wal_database, redis_url=redis_url, **slot) as gw:
        await _until_epoch_changes(gw, _epoch_of(old_cursor))
        assert any("another database" in r.getMessage() for r in caplog.records), caplog.text
        resumed = await _socket(gw, since=old_cursor)
        assert _resynced(resumed), resumed.messages[:2]
        fresh = await _socket(gw)
        _insert(small_wal_database, range(1, 51))
        await _wait_seqs(fresh, 50)
        await _wait_seqs(resumed, 50)
        assert _seqs(fresh) == list(range(1, 51))
        assert _seqs(resumed) == list(range(1, 51))
        assert fresh.messages[0]["payload"]["cursor"] != old_cursor


@integration
async def test_a_cursor_from_another_database_gets_resync_required(
    database_url: str, pg_server: PostgresServer
) -> None:
    """Both databases live in one cluster, so the other database's cursor lies inside this
    history's range of positions: only its epoch tells it apart."""
    with pg_server.fresh_database() as other_dsn:
        async with _gateway(database_url, **_slot()) as here:
            async with _gateway(other_dsn, **_slot()) as there:
                elsewhere = await _socket(there)
                _insert(other_dsn, range(1, 2))
                await _wait_seqs(elsewhere, 1)
                foreign = elsewhere.events()[-1]["id"]
            local = await _socket(here)
            _insert(database_url, range(1, 3))
            await _wait_seqs(local, 2)
            assert cursor_key(foreign) < cursor_key(local.events()[-1]["id"])  # type: ignore[operator]
            resumed = await _socket(here, since=foreign)
            assert _resynced(resumed), resumed.messages[:2]


@integration
async def test_cursors_from_before_a_restart_of_the_same_database_resume(
    database_url: str,
) -> None:
    slot = _slot()
    async with _gateway(database_url, **slot) as gw:
        sock = await _socket(gw)
        _insert(database_url, range(1, 3))
        await _wait_seqs(sock, 2)
        cursor = sock.events()[-1]["id"]
    _insert(database_url, range(3, 6))  # while walcast is stopped
    async with _gateway(database_url, **slot) as gw:
        resumed = await _socket(gw, since=cursor)
        await _wait_seqs(resumed, 5)
        assert not _resynced(resumed)
        assert _seqs(resumed) == [3, 4, 5]


def _invalidate(dsn: str, slot: str) -> None:
    """Write WAL past the 1 MB the server keeps for a slot, then checkpoint: PostgreSQL
    invalidates the (inactive) slot and removes the WAL it held."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for seq in range(100, 104):
            conn.execute("INSERT INTO items VALUES (%s, %s)", (seq, ORG))  # never delivered
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        row = conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    assert row is not None and row[0] == "lost", row


@integration
async def test_a_slot_invalidated_while_walcast_was_stopped_is_explained_and_recreated(
    small_wal_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = small_wal_database
    slot = _slot()
    async with _gateway(dsn, **slot) as gw:
        sock = await _socket(gw)
        _insert(dsn, range(1, 3))
        await _wait_seqs(sock, 2)
        old_cursor = sock.events()[-1]["id"]
    _invalidate(dsn, slot["slot"])

    caplog.set_level(logging.INFO)
    async with _gateway(dsn, **slot) as gw:
        warning = next(r.getMessage() for r in caplog.records if "invalidated" in r.getMessage())
        assert "max_slot_wal_keep_size (1MB)" in warning and "keep walcast running" in warning
        assert "resync_required" in warning
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                (slot["slot"],),
            ).fetchone()
        assert row is not None and row[0] != "lost"
        resumed = await _socket(gw, since=old_cursor)
        assert _resynced(resumed), resumed.messages[:2]
        _insert(dsn, range(200, 203))
        await _wait_seqs(resumed, 202)
        assert _seqs(resumed) == [200, 201, 202]  # the new rows, and none from the lost WAL


@integration
async def test_redis_bus_starts_a_new_epoch_after_the_slot_was_invalidated(
    small_wal_database: str, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = small_wal_database
    slot = _slot()
    async with _gateway(dsn, redis_url=redis_url, **slot) as gw:
        sock = await _socket(gw)
        _insert(dsn, range(1, 3))
        await _wait_seqs(sock, 2)
        old_cursor = sock.events()[-1]["id"]
    _invalidate(dsn, slot["slot"])

    caplog.set_level(logging.INFO)
    async with _gateway(dsn, redis_url=redis_url, **slot) as gw:
        await _until_epoch_changes(gw, _epoch_of(old_cursor))
        assert any("re-created or invalidated" in r.getMessage() for r in caplog.records)
        resumed = await _socket(gw, since=old_cursor)
        assert _resynced(resumed), resumed.messages[:2]
        assert _epoch_of(resumed.messages[1]["payload"]["cursor"]) != _epoch_of(old_cursor)
        _insert(dsn, range(200, 203))
        await _wait_seqs(resumed, 202)
        assert _seqs(resumed) == [200, 201, 202]


@integration
async def test_a_slot_invalidated_while_walcast_streams_closes_sockets_and_starts_over(
    small_wal_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The slot holds `historySeconds` of WAL on purpose, so a burst of WAL past
    max_slot_wal_keep_size invalidates it under a running walcast: the gap must reach every
    client as resync_required, not as silence, and walcast must go on streaming."""
    dsn = small_wal_database
    slot = _slot()
    caplog.set_level(logging.INFO)
    async with _gateway(dsn, **slot) as gw:
        live = await _socket(gw)
        _insert(dsn, range(1, 3))
        await _wait_seqs(live, 2)
        cursor = live.events()[-1]["id"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for seq in range(100, 104):
                conn.execute("INSERT INTO items VALUES (%s, %s)", (seq, ORG))
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        assert await live.wait_closed(30) == 1013
        assert any("created anew" in r.getMessage() for r in caplog.records), caplog.text
        await asyncio.wait_for(gw.app[STATE].readiness.wait(), 30)
        resumed = await _socket(gw, since=cursor)
        assert _resynced(resumed), resumed.messages[:2]
        _insert(dsn, range(200, 202))
        await _wait_seqs(resumed, 201)
        assert _seqs(resumed)[-2:] == [200, 201]
