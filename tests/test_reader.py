"""cdc.reader (and cdc.catalog) against a real PostgreSQL: what is committed arrives, once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import secrets
import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from cdc import catalog
from cdc.changes import (
    Item,
    LogicalMessage,
    RowChange,
    TableColumns,
    TransactionEnd,
    TransactionStart,
)
from cdc.errors import ReplicationError
from cdc.reader import (
    COALESCE_BYTES,
    COALESCE_RATE,
    COALESCE_SECONDS,
    DECODE_SLICE,
    ReplicationReader,
    coalesce_delay,
)
from tests.pg import PostgresServer

pytestmark = pytest.mark.integration

STEP = 15.0  # seconds any single item may take before the test fails instead of hanging


def execute(dsn: str, *statements: str) -> None:
    """Run statements, each in its own transaction (autocommit)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def transaction(dsn: str, *statements: str) -> None:
    """Run statements in one transaction."""
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def query(dsn: str, statement: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(statement).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


async def prepare(dsn: str, tables: list[str], slot: str = "walcast") -> None:
    """Create publication and slot now, so writes made before the first read are captured."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await catalog.ensure_publication(conn, "walcast", tables)
        await catalog.create_slot(conn, slot)


def make_reader(dsn: str, tables: list[str], **options: Any) -> ReplicationReader:
    options.setdefault("backoff_base", 0.1)
    options.setdefault("backoff_cap", 0.5)
    options.setdefault("status_interval", 1.0)
    return ReplicationReader(dsn, tables=tables, **options)


@contextlib.asynccontextmanager
async def streaming(reader: ReplicationReader) -> AsyncIterator[AsyncIterator[Item]]:
    it = reader.items()
    try:
        yield it
    finally:
        await reader.aclose()


async def take(it: AsyncIterator[Item], count: int) -> list[Item]:
    items = []
    for _ in range(count):
        items.append(await asyncio.wait_for(anext(it), STEP))
    return items


async def take_transactions(it: AsyncIterator[Item], count: int) -> list[list[Item]]:
    """`count` whole transactions, each from its TransactionStart to its TransactionEnd."""
    transactions: list[list[Item]] = []
    current: list[Item] = []
    while len(transactions) < count:
        item = await asyncio.wait_for(anext(it), STEP)
        current.append(item)
        if isinstance(item, TransactionEnd):
            transactions.append(current)
            current = []
    return transactions


async def wait_streaming(reader: ReplicationReader) -> None:
    async with asyncio.timeout(STEP):
        while not reader.streaming:  # noqa: ASYNC110 - polling a property in a test
            await asyncio.sleep(0.02)


def changes(items: list[Item]) -> list[RowChange]:
    return [item for item in items if isinstance(item, RowChange)]


def check_transaction(items: list[Item]) -> None:
    """Framing and cursors of one transaction: start, positions 1..n, end, one commit LSN."""
    start, *body, end = items
    assert isinstance(start, TransactionStart)
    assert isinstance(end, TransactionEnd)
    assert end.commit_lsn == start.commit_lsn < end.end_lsn
    changed = [item for item in body if not isinstance(item, TableColumns)]
    for position, item in enumerate(changed, 1):
        assert isinstance(item, RowChange | LogicalMessage)
        assert (item.commit_lsn, item.position) == (start.commit_lsn, position)


# -- row changes ---------------------------------------------------------------------------------


async def test_insert_update_delete_full_identity(database_url: str) -> None:
    execute(
        database_url,
        "CREATE TABLE app (id int PRIMARY KEY, name text, score numeric)",
        "ALTER TABLE app REPLICA IDENTITY FULL",
    )
    await prepare(database_url, ["public.app"])
    transaction(
        database_url,
        "INSERT INTO app VALUES (1, 'a', 1.50), (2, 'b', NULL)",
        "UPDATE app SET name = 'z' WHERE id = 1",
        "DELETE FROM app WHERE id = 2",
    )
    execute(database_url, "INSERT INTO app VALUES (3, 'c', 3)")
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        first, second = await take_transactions(it, 2)
    check_transaction(first)
    check_transaction(second)
    assert first[-1].end_lsn <= second[0].commit_lsn  # type: ignore[union-attr]
    ins1, ins2, upd, dele = changes(first)
    assert (ins1.kind, ins1.table, ins1.schema) == ("INSERT", "app", "public")
    assert ins1.new is not None and ins1.new["id"] == 1 and ins1.new["name"] == "a"
    assert str(ins1.new["score"]) == "1.50" and ins1.old is None
    assert ins2.new == {"id": 2, "name": "b", "score": None}
    assert upd.kind == "UPDATE" and upd.new is not None and upd.old is not None
    assert (upd.new["name"], upd.old["name"]) == ("z", "a")
    assert dele.kind == "DELETE" and dele.new is None
    assert dele.old == {"id": 2, "name": "b", "score": None}
    assert [c.new["id"] for c in changes(second) if c.new] == [3]


async def test_default_identity_sends_key_only(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY, name text)")
    await prepare(database_url, ["public.app"])
    execute(
        database_url,
        "INSERT INTO app VALUES (1, 'a'), (2, 'b')",
        "UPDATE app SET name = 'z' WHERE id = 1",
        "UPDATE app SET id = 10 WHERE id = 2",
        "DELETE FROM app WHERE id = 1",
    )
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        transactions = await take_transactions(it, 4)
    for items in transactions:
        check_transaction(items)
    upd, key_change, dele = (changes(t)[0] for t in transactions[1:])
    assert upd.new == {"id": 1, "name": "z"} and upd.old is None
    assert key_change.new == {"id": 10, "name": "b"} and key_change.old == {"id": 2}
    assert dele.old == {"id": 1} and dele.new is None


async def test_truncate(database_url: str) -> None:
    execute(database_url, "CREATE TABLE a (id int PRIMARY KEY)", "CREATE TABLE b (id int)")
    await prepare(database_url, ["public.a", "public.b"])
    execute(database_url, "INSERT INTO a VALUES (1)", "TRUNCATE a, b")
    async with streaming(make_reader(database_url, ["public.a", "public.b"])) as it:
        _, truncate = await take_transactions(it, 2)
    check_transaction(truncate)
    assert sorted((c.kind, c.table, c.new, c.old) for c in changes(truncate)) == [
        ("TRUNCATE", "a", None, None),
        ("TRUNCATE", "b", None, None),
    ]


async def test_rolled_back_transaction_yields_nothing(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO app VALUES (1)")
        conn.rollback()
        conn.execute("INSERT INTO app VALUES (2)")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO app VALUES (3)")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("INSERT INTO app VALUES (4)")
        conn.commit()
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        (items,) = await take_transactions(it, 1)
    check_transaction(items)
    assert [c.new for c in changes(items)] == [{"id": 2}, {"id": 4}]


async def test_logical_message_in_commit_order(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    transaction(
        database_url,
        "INSERT INTO app VALUES (1)",
        """SELECT pg_logical_emit_message(true, 'walcast', '{"event": "e", "payload": {}}')""",
        "INSERT INTO app VALUES (2)",
    )
    execute(database_url, "SELECT pg_logical_emit_message(true, 'walcast', '{\"n\": 2}')")
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        first, second = await take_transactions(it, 2)
    check_transaction(first)
    _, columns, before, message, after, _ = first
    assert columns == TableColumns(first[0].commit_lsn, 0, "public", "app", ("id",))
    assert isinstance(before, RowChange) and before.new == {"id": 1}
    assert isinstance(message, LogicalMessage)
    assert message.prefix == "walcast"
    assert message.content == b'{"event": "e", "payload": {}}'
    assert isinstance(after, RowChange) and after.new == {"id": 2}
    assert [type(i) for i in second] == [TransactionStart, LogicalMessage, TransactionEnd]


async def test_add_column_between_inserts(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    execute(
        database_url,
        "INSERT INTO app VALUES (1)",
        "ALTER TABLE app ADD COLUMN label text DEFAULT 'x'",
        "INSERT INTO app VALUES (2, 'y')",
    )
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        first, second = await take_transactions(it, 2)
    assert changes(first)[0].new == {"id": 1}
    assert changes(second)[0].new == {"id": 2, "label": "y"}


async def test_user_defined_types_are_resolved(database_url: str) -> None:
    execute(
        database_url,
        "CREATE TYPE mood AS ENUM ('sad', 'happy')",
        "CREATE TYPE pair AS (a int, dropped text, b mood)",
        "ALTER TYPE pair DROP ATTRIBUTE dropped",
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
        "CREATE TABLE app (id posint PRIMARY KEY, moods mood[], p pair)",
    )
    await prepare(database_url, ["public.app"])
    execute(database_url, "INSERT INTO app VALUES (1, '{happy,sad}', ROW(7, 'happy'))")
    async with streaming(make_reader(database_url, ["public.app"])) as it:
        (items,) = await take_transactions(it, 1)
    assert changes(items)[0].new == {
        "id": 1,
        "moods": ["happy", "sad"],
        "p": {"a": 7, "b": "happy"},
    }


async def test_fetch_types_describes_a_type_tree(database_url: str) -> None:
    execute(
        database_url,
        "CREATE TYPE mood AS ENUM ('sad', 'happy')",
        "CREATE TYPE pair AS (a int, dropped text, b mood)",
        "ALTER TYPE pair DROP ATTRIBUTE dropped",
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    )
    pair_array = query(database_url, "SELECT '_pair'::regtype::oid::int")
    posint = query(database_url, "SELECT 'posint'::regtype::oid::int")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        found = {t.name: t for t in await catalog.fetch_types(conn, [pair_array, posint, 1])}
    assert set(found) == {"_pair", "pair", "mood", "posint"}
    assert found["_pair"].element_oid == found["pair"].oid
    assert found["pair"].array_oid == pair_array and found["pair"].typtype == "c"
    assert found["pair"].fields == (("a", 23), ("b", found["mood"].oid))
    assert found["mood"].typtype == "e" and found["mood"].namespace == "public"
    assert found["posint"].typtype == "d" and found["posint"].base_oid == 23


@pytest.mark.parametrize("identity", ["FULL", "DEFAULT"])
async def test_unchanged_toast_value(database_url: str, identity: str) -> None:
    execute(
        database_url,
        "CREATE TABLE doc (id int PRIMARY KEY, title text, body text)",
        "ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL",
        f"ALTER TABLE doc REPLICA IDENTITY {identity}",
    )
    await prepare(database_url, ["public.doc"])
    body = secrets.token_hex(700_000)  # 1.4 MB, stored out of line
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO doc VALUES (1, 'a', %s)", (body,))
        conn.execute("UPDATE doc SET title = 'b' WHERE id = 1")
    async with streaming(make_reader(database_url, ["public.doc"])) as it:
        _, update = await take_transactions(it, 2)
    (change,) = changes(update)
    assert change.new is not None
    if identity == "FULL":
        assert change.new == {"id": 1, "title": "b", "body": body}
        assert change.unchanged == ()
        assert change.old is not None and change.old["title"] == "a"
    else:
        assert change.new == {"id": 1, "title": "b"}
        assert change.unchanged == ("body",)
        assert change.old is None


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_large_transaction_streams_in_order(database_url: str) -> None:
    rows = 100_000
    execute(database_url, "CREATE TABLE big (id int PRIMARY KEY, payload text)")
    await prepare(database_url, ["public.big"])
    execute(
        database_url,
        f"INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, {rows}) g",
        "INSERT INTO big VALUES (0, 'after')",
    )
    reader = make_reader(database_url, ["public.big"])
    async with streaming(reader) as it:
        start = await asyncio.wait_for(anext(it), STEP)
        assert isinstance(start, TransactionStart)
        baseline = _rss()
        peak = baseline
        tracemalloc.start()
        expected = 1
        async with asyncio.timeout(60):
            async for item in it:
                if isinstance(item, TransactionEnd):
                    break
                if isinstance(item, TableColumns):
                    continue
                assert isinstance(item, RowChange) and item.new is not None
                assert (item.position, item.new["id"]) == (expected, expected)
                if expected == 1000:
                    # Yielded as it arrives: the reader is nowhere near the commit record yet.
                    assert reader.received_lsn < start.commit_lsn
                if expected % 5000 == 0:
                    peak = max(peak, _rss())
                expected += 1
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert expected - 1 == rows
        (after,) = changes(await take(it, 3))
        assert after.new == {"id": 0, "payload": "after"}
    # 100,000 buffered rows would take well over 40 MB; streaming keeps the reader flat.
    assert traced_peak < 8 * 1024 * 1024, traced_peak
    assert peak - baseline < 30 * 1024 * 1024, peak - baseline


async def test_a_catch_up_hands_rows_out_in_slices_without_young_collections(
    database_url: str,
) -> None:
    """A read of a backlog takes hundreds of messages; were they all decoded before the first
    was handed out, the rows in flight would set off a young collection nearly every read,
    walking them all (and promoting them towards full collections). Handed out a slice at a
    time, a catch-up by a consumer that keeps nothing collects next to never."""
    rows, per_transaction = 20_000, 1_000
    execute(database_url, "CREATE TABLE backlog (id int PRIMARY KEY, note text, n int)")
    await prepare(database_url, ["public.backlog"])
    for first in range(1, rows, per_transaction):
        execute(
            database_url,
            f"INSERT INTO backlog SELECT g, 'row ' || g, g FROM generate_series({first},"
            f" {first + per_transaction - 1}) g",
        )
    collections = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal collections
        collections += phase == "stop"

    reader = make_reader(database_url, ["public.backlog"], read_ahead_bytes=1024 * 1024)
    batches = reader.batches()
    seen, largest = 0, 0
    try:
        first = await asyncio.wait_for(anext(batches), STEP)  # connected: the backlog is there
        gc.collect()
        gc.callbacks.append(count)
        try:
            batch = first
            while True:
                got = sum(type(item) is RowChange for item in batch)
                largest = max(largest, got)
                seen += got
                if seen == rows:
                    break
                batch = await asyncio.wait_for(anext(batches), STEP)
        finally:
            gc.callbacks.remove(count)
    finally:
        await reader.aclose()
    assert largest <= DECODE_SLICE
    # Decoded a read at a time, the same backlog makes dozens (a 1 MiB read holds ~15,000
    # tracked objects); whatever the event loop allocates meanwhile makes a few.
    assert collections <= 5, collections


def test_only_a_read_that_found_a_busy_stream_makes_the_next_one_wait() -> None:
    budget, fast = 64 * 1024, 0.0002  # 0.2 ms after the read before: a catch-up's pace
    assert coalesce_delay(COALESCE_BYTES, budget, fast) == COALESCE_SECONDS
    assert coalesce_delay(budget - 1, budget, 0.003) == COALESCE_SECONDS  # 21 MB/s
    assert coalesce_delay(COALESCE_BYTES - 1, budget, fast) == 0.0  # a little: read at once
    assert coalesce_delay(200, budget, 0.0) == 0.0  # one change: its latency is untouched
    # A live stream's backlog after a 10 ms stall (2,000 transactions a second): at once.
    assert coalesce_delay(20 * 1024, budget, 0.010) == 0.0
    assert COALESCE_RATE * 0.010 > 20 * 1024
    assert coalesce_delay(budget, budget, fast) == 0.0  # stopped by the budget: more waits
    assert coalesce_delay(budget + 300, budget, fast) == 0.0  # the last message crossed it
    assert coalesce_delay(0, 0, 0.0) == 0.0


async def test_a_lone_change_after_a_busy_stream_still_arrives(database_url: str) -> None:
    """The reads of a backlog wait for more to arrive; the change after it must not wait
    for company that never comes."""
    execute(database_url, "CREATE TABLE burst (id int PRIMARY KEY, note text)")
    await prepare(database_url, ["public.burst"])
    execute(
        database_url,
        "INSERT INTO burst SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
    )
    reader = make_reader(database_url, ["public.burst"])
    batches = reader.batches()
    try:
        seen = 0
        while seen < 20_000:
            batch = await asyncio.wait_for(anext(batches), STEP)
            seen += sum(type(item) is RowChange for item in batch)
        for row in (20_001, 20_002):  # one at a time, each alone on the stream
            execute(database_url, f"INSERT INTO burst VALUES ({row}, 'alone')")
            while True:
                batch = await asyncio.wait_for(anext(batches), STEP)
                found = [item for item in batch if type(item) is RowChange]
                if found:
                    assert [item.new["id"] for item in found] == [row]  # type: ignore[index]
                    break
    finally:
        await reader.aclose()


# -- reconnects and exactly once -----------------------------------------------------------------


async def _walsender_pid(dsn: str, slot: str = "walcast") -> int | None:
    for _ in range(100):
        pid = query(
            dsn,
            f"SELECT coalesce((SELECT active_pid FROM pg_replication_slots"
            f" WHERE slot_name = '{slot}'), 0)",
        )
        if pid:
            return int(pid)
        await asyncio.sleep(0.05)
    return None


async def test_connection_killed_mid_transaction_no_loss_no_duplicate(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rows = 50_000  # several MB: more than the socket buffers hold when the session dies
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    execute(
        database_url,
        f"INSERT INTO app SELECT g FROM generate_series(1, {rows}) g",
        "INSERT INTO app VALUES (-1)",
    )
    caplog.set_level(logging.WARNING, logger="cdc.reader")
    reader = make_reader(database_url, ["public.app"])
    async with streaming(reader) as it:
        head = await take(it, 11)  # start + 10 rows of the big transaction
        pid = await _walsender_pid(database_url)
        execute(database_url, f"SELECT pg_terminate_backend({pid})")
        execute(database_url, "INSERT INTO app VALUES (-2)")  # only a new session brings this
        rest = await take_transactions(it, 3)
    first = head + rest[0]
    check_transaction(first)
    assert [c.new["id"] for c in changes(first) if c.new] == list(range(1, rows + 1))
    assert [c.new for c in changes(rest[1])] == [{"id": -1}]
    assert [c.new for c in changes(rest[2])] == [{"id": -2}]
    assert "reconnecting" in caplog.text


async def test_postgres_restart_mid_stream(
    pg_server: PostgresServer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not pg_server.can_restart:
        pytest.skip("the test server cannot be restarted")
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    for n in range(1, 11):
        execute(database_url, f"INSERT INTO app VALUES ({n})")
    execute(database_url, "INSERT INTO app SELECT g FROM generate_series(11, 50000) g")
    caplog.set_level(logging.WARNING, logger="cdc.reader")
    reader = make_reader(database_url, ["public.app"])
    seen: list[int] = []
    keys: list[tuple[int, int]] = []

    def record(items: list[Item]) -> None:
        for item in items:
            if isinstance(item, RowChange) and item.new is not None:
                seen.append(item.new["id"])
                keys.append((item.commit_lsn, item.position))

    async with streaming(reader) as it:
        record(await take(it, 5 * 3 + 100))  # five small transactions, then into the big one
        await asyncio.to_thread(pg_server.restart, mode="immediate")
        execute(database_url, "INSERT INTO app VALUES (99999)")
        while not seen or seen[-1] != 99999:
            record(await take(it, 1))
        assert reader.streaming
    assert seen == [*range(1, 50001), 99999]
    assert "reconnecting" in caplog.text
    assert keys == sorted(set(keys))


async def test_fast_restart_while_the_slot_is_held_back(
    pg_server: PostgresServer, database_url: str
) -> None:
    """The consumer retains what it handled (history): the slot stays behind, yet a fast
    shutdown completes at once, and the reader resumes with nothing lost or repeated."""
    if not pg_server.can_restart:
        pytest.skip("the test server cannot be restarted")
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    execute(database_url, *[f"INSERT INTO app VALUES ({n})" for n in range(1, 6)])
    reader = make_reader(database_url, ["public.app"], status_interval=0.2)
    async with streaming(reader) as it:
        first = await take_transactions(it, 5)
        reader.retain_from(first[0][0].commit_lsn)  # everything handled is still needed
        waiting = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.5)  # status updates go out: the slot is held at the first commit
        held = await _confirmed(database_url)
        assert held <= first[0][0].commit_lsn
        restart = asyncio.ensure_future(asyncio.to_thread(pg_server.restart, mode="fast"))
        try:
            await asyncio.wait_for(asyncio.shield(restart), 8)
        finally:
            if not restart.done():
                await reader.aclose()  # let a blocked stop finish, then fail
                await restart
        execute(database_url, "INSERT INTO app VALUES (6)")
        start = await asyncio.wait_for(waiting, STEP)
        (rest,) = await take_transactions(it, 1)
    assert [c.new for c in changes([start, *rest])] == [{"id": 6}]
    assert await _confirmed(database_url) == held  # the shutdown's replies did not move it


async def test_slot_in_use_waits_then_takes_over(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cdc.reader")
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    execute(database_url, "INSERT INTO app VALUES (1)")
    first = make_reader(database_url, ["public.app"])
    second = make_reader(database_url, ["public.app"])
    it1 = first.items()
    (tx1,) = await take_transactions(it1, 1)
    assert [c.new for c in changes(tx1)] == [{"id": 1}]
    pending = asyncio.ensure_future(anext(it1))  # asks past tx1: handled, may be confirmed
    it2 = second.items()
    waiting = asyncio.ensure_future(anext(it2))
    await asyncio.sleep(1.0)
    assert not waiting.done() and not second.streaming  # "slot is active": retrying
    holder = await _walsender_pid(database_url)
    busy = [r for r in caplog.records if r.getMessage() == "replication slot in use; retrying"]
    assert busy, caplog.text
    assert busy[0].error == (  # type: ignore[attr-defined]
        f'SlotInUse: replication slot "walcast" is already streaming to another process'
        f' (pid {holder}, application_name "walcast"): another walcast on this database?'
        " Stop it, or give this one its own slot (--slot or WALCAST_SLOT). If that process"
        f" is stale, end it: SELECT pg_terminate_backend({holder});"
    )
    await first.aclose()  # from another task than the one reading: its iteration ends
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, STEP)
    assert not first.connected
    execute(database_url, "INSERT INTO app VALUES (2)")
    try:
        start = await asyncio.wait_for(waiting, STEP)
        rest = await take_transactions(it2, 1)
    finally:
        await second.aclose()
    # The first reader's final status update confirmed tx1: the second starts after it.
    assert [c.new for c in changes([start, *rest[0]])] == [{"id": 2}]


# -- flush position ------------------------------------------------------------------------------


@pytest.fixture
def short_sender_timeout(pg_server: PostgresServer) -> Iterator[None]:
    execute(pg_server.dsn, "ALTER SYSTEM SET wal_sender_timeout = '2s'", "SELECT pg_reload_conf()")
    try:
        yield
    finally:
        execute(pg_server.dsn, "ALTER SYSTEM RESET wal_sender_timeout", "SELECT pg_reload_conf()")


async def _confirmed(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        status = await catalog.slot_status(conn, "walcast")
    assert status is not None and status.confirmed_flush_lsn is not None
    return status.confirmed_flush_lsn


async def _current_lsn(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await catalog.current_wal_lsn(conn)


async def _confirmed_once_at(dsn: str, lsn: int, seconds: float = 10.0) -> int:
    """The slot's confirmed position, once it reaches `lsn` or after `seconds`."""
    for _ in range(int(seconds * 10)):
        confirmed = await _confirmed(dsn)
        if confirmed >= lsn:
            return confirmed
        await asyncio.sleep(0.1)
    return await _confirmed(dsn)


async def _app_with_one_row_and_other(database_url: str) -> ReplicationReader:
    """Table `app`, published, with one row committed; table `other`, not published, to move
    the WAL on without events. The reader reports every 10 s, so the server's keepalives ask
    for replies in between."""
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)", "CREATE TABLE other (id int)")
    await prepare(database_url, ["public.app"])
    execute(database_url, "INSERT INTO app VALUES (1)")
    return make_reader(database_url, ["public.app"], status_interval=10.0)


async def test_idle_keepalives_and_flush_position(
    database_url: str, short_sender_timeout: None
) -> None:
    reader = await _app_with_one_row_and_other(database_url)
    async with streaming(reader) as it:
        (tx,) = await take_transactions(it, 1)
        pid = await _walsender_pid(database_url)
        retained = await _current_lsn(database_url)
        reader.retain_from(retained)
        waiting = asyncio.ensure_future(anext(it))
        # WAL moves on (tables outside the publication), the stream stays idle for > 5 s.
        execute(database_url, *["INSERT INTO other VALUES (1)"] * 20)
        moved = await _current_lsn(database_url)
        await asyncio.sleep(5.5)
        assert not waiting.done()
        assert reader.connected and reader.streaming
        assert await _walsender_pid(database_url) == pid  # same session: keepalives answered
        held = await _confirmed(database_url)
        assert tx[-1].end_lsn <= held <= retained  # type: ignore[union-attr]

        reader.retain_from(None)  # nothing retained: an idle database does not pin WAL
        assert await _confirmed_once_at(database_url, moved) >= moved
        assert reader.flushed_lsn >= moved
        assert reader.server_wal_end >= moved

        execute(database_url, "INSERT INTO app VALUES (2)")
        start = await asyncio.wait_for(waiting, STEP)
        assert isinstance(start, TransactionStart)


async def test_flush_never_inside_an_unhandled_transaction(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    await prepare(database_url, ["public.app"])
    execute(database_url, "INSERT INTO app VALUES (1)", "INSERT INTO app VALUES (2), (3)")
    reader = make_reader(database_url, ["public.app"], status_interval=0.1)
    async with streaming(reader) as it:
        (tx1,) = await take_transactions(it, 1)
        await take(it, 2)  # start and the first row of tx2; it is not handled yet
        end1 = tx1[-1].end_lsn  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        assert reader.flushed_lsn <= end1
    assert await _confirmed(database_url) <= end1


async def test_keepalives_wait_for_transactions_read_ahead_but_not_handled(
    database_url: str, short_sender_timeout: None
) -> None:
    """One read takes several transactions and a keepalive behind them; the keepalive moves
    the flush position only once the consumer has handled every one of them."""
    reader = await _app_with_one_row_and_other(database_url)
    async with streaming(reader) as it:
        (tx1,) = await take_transactions(it, 1)
        end1 = tx1[-1].end_lsn  # type: ignore[union-attr]
        execute(database_url, *[f"INSERT INTO app VALUES ({n})" for n in range(2, 6)])
        execute(database_url, *["INSERT INTO other VALUES (1)"] * 20)  # WAL moves on
        # wal_sender_timeout is 2 s: after 1 s without a reply the server sends a keepalive
        # asking for one, which now waits in the socket behind tx2..tx5.
        await asyncio.sleep(1.3)
        await take(it, 1)  # tx2's start: tx1 handled; tx2..tx5 and the keepalive read
        assert reader.flushed_lsn <= end1  # the reply went out, without passing tx2..tx5
        assert await _confirmed(database_url) <= end1

        rest = await take_transactions(it, 4)  # tx2's start was taken above
        assert [row.new["id"] for tx in rest for row in tx if isinstance(row, RowChange)] == [
            2, 3, 4, 5
        ]  # fmt: skip
        moved = await _current_lsn(database_url)
        waiting = asyncio.ensure_future(anext(it))  # tx5 handled; the reader waits, idle
        assert await _confirmed_once_at(database_url, moved) >= moved  # all handled: it moves
        waiting.cancel()


async def test_a_transaction_sent_again_after_a_reconnect_still_lets_keepalives_move(
    database_url: str, short_sender_timeout: None
) -> None:
    """tx1 is handled but not yet confirmed when the session dies: the server sends it again,
    the reader skips it, and the skipped transaction still counts as handled."""
    reader = await _app_with_one_row_and_other(database_url)
    async with streaming(reader) as it:
        (tx1,) = await take_transactions(it, 1)
        waiting = asyncio.ensure_future(anext(it))  # tx1 handled, not confirmed (10 s)
        pid = await _walsender_pid(database_url)
        assert await _confirmed(database_url) < tx1[-1].end_lsn  # type: ignore[union-attr]
        execute(database_url, f"SELECT pg_terminate_backend({pid})")
        execute(database_url, *["INSERT INTO other VALUES (1)"] * 20)  # WAL moves on, idle
        moved = await _current_lsn(database_url)
        # tx1, sent again and skipped, counts as handled: idle keepalives move the position
        assert await _confirmed_once_at(database_url, moved, seconds=15) >= moved
        assert not waiting.done()  # and it was not handed out twice
        waiting.cancel()


# -- set-up checks -------------------------------------------------------------------------------


async def test_replica_identity_check_is_fatal(database_url: str) -> None:
    execute(database_url, "CREATE TABLE app (id int PRIMARY KEY)")
    reader = make_reader(database_url, ["public.app"], replica_identity="check")
    async with streaming(reader) as it:
        with pytest.raises(
            ReplicationError, match=re.escape('ALTER TABLE "public"."app" REPLICA IDENTITY FULL;')
        ):
            await asyncio.wait_for(anext(it), STEP)

    managed = make_reader(database_url, ["app"], replica_identity="manage")
    execute(database_url, "INSERT INTO app VALUES (1)")
    async with streaming(managed) as it:
        first = asyncio.ensure_future(anext(it))
        await wait_streaming(managed)
        execute(database_url, "DELETE FROM app")
        start = await asyncio.wait_for(first, STEP)
        (rest,) = await take_transactions(it, 1)
    assert changes([start, *rest])[0].old == {"id": 1}
    assert query(database_url, "SELECT relreplident FROM pg_class WHERE relname = 'app'") == "f"


async def test_missing_table_is_fatal(database_url: str) -> None:
    reader = make_reader(database_url, ["public.nope"])
    async with streaming(reader) as it:
        with pytest.raises(ReplicationError, match=r"public\.nope"):
            await asyncio.wait_for(anext(it), STEP)


async def test_publication_kept_in_step(database_url: str) -> None:
    execute(
        database_url,
        "CREATE TABLE a (id int PRIMARY KEY)",
        "CREATE TABLE b (id int PRIMARY KEY)",
        'CREATE TABLE member (id text PRIMARY KEY, "userId" text)',
        'CREATE TABLE "session" (token text PRIMARY KEY)',
    )

    async def published() -> set[str]:
        rows = await conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'pub'"
        )
        return {row[0] for row in await rows.fetchall()}

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await catalog.ensure_publication(conn, "pub", ["a"])
        assert await published() == {"public.a", "public.member", "public.session"}
        await catalog.ensure_publication(conn, "pub", ["public.b"])
        assert await published() == {"public.b", "public.member", "public.session"}
        await catalog.ensure_publication(conn, "pub", ["public.b"])  # idempotent
        assert await published() == {"public.b", "public.member", "public.session"}
        problems = await catalog.replica_identity_problems(conn, ["a", "public.b"])
        assert problems == [
            'ALTER TABLE "public"."a" REPLICA IDENTITY FULL;',
            'ALTER TABLE "public"."b" REPLICA IDENTITY FULL;',
        ]
        assert await catalog.set_replica_identity_full(conn, ["a"]) == ["a"]
        assert await catalog.replica_identity_problems(conn, ["a"]) == []
        assert await catalog.wal_level(conn) == "logical"  # the test server's setting
        assert await catalog.create_slot(conn, "other")
        assert not await catalog.create_slot(conn, "other")  # exists: kept as it is


async def test_unreachable_server_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="cdc.reader")
    reader = ReplicationReader(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2",
        backoff_base=0.02,
        backoff_cap=0.1,
    )
    it = reader.items()
    waiting = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.8)
    assert not waiting.done() and not reader.connected
    attempts = [r for r in caplog.records if "reconnecting" in r.getMessage()]
    assert len(attempts) >= 3
    assert [r.attempt for r in attempts[:3]] == [1, 2, 3]  # type: ignore[attr-defined]
    assert all(0 <= r.delay <= 0.1 for r in attempts)  # type: ignore[attr-defined]
    await reader.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, STEP)
