"""cdc.transport against a real walsender: queries, errors, COPY BOTH, close."""

from __future__ import annotations

import asyncio
import struct

import psycopg
import pytest

from cdc.errors import ReplicationError
from cdc.lsn import parse_lsn
from cdc.transport import ConnectionLost, ReplicationConnection, ServerError

pytestmark = pytest.mark.integration

TIMEOUT = 20


async def test_identify_system(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await ReplicationConnection.connect(database_url)
        try:
            ((systemid, timeline, xlogpos, dbname),) = await conn.simple_query("IDENTIFY_SYSTEM")
        finally:
            conn.close()
    assert systemid and int(systemid) > 0
    assert timeline and int(timeline) >= 1
    assert xlogpos and parse_lsn(xlogpos) > 0
    assert dbname == psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]


async def test_session_settings_are_applied(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await ReplicationConnection.connect(database_url)
        try:
            assert conn.parameter_status("TimeZone") == "UTC"
            assert (conn.parameter_status("DateStyle") or "").startswith("ISO")
            assert conn.parameter_status("IntervalStyle") == "postgres"
            assert await conn.simple_query("SHOW extra_float_digits") == [("1",)]
            assert await conn.simple_query("SHOW bytea_output") == [("hex",)]
            assert await conn.simple_query("SELECT 1, NULL") == [("1", None)]
        finally:
            conn.close()


async def test_server_error_carries_message(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await ReplicationConnection.connect(database_url)
        try:
            with pytest.raises(ServerError, match='replication slot "missing" does not exist'):
                await conn.start_replication("missing", 0, {"proto_version": "1"})
            # The connection is still usable after the error.
            assert len(await conn.simple_query("IDENTIFY_SYSTEM")) == 1
            with pytest.raises(ReplicationError, match="syntax error"):
                await conn.simple_query("NOT A COMMAND")
        finally:
            conn.close()


async def test_slot_active_elsewhere(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        first = await ReplicationConnection.connect(database_url)
        second = await ReplicationConnection.connect(database_url)
        try:
            await first.simple_query("CREATE_REPLICATION_SLOT busy LOGICAL pgoutput")
            with pytest.raises(ServerError) as info:
                await first.simple_query("CREATE_REPLICATION_SLOT busy LOGICAL pgoutput")
            assert info.value.sqlstate == "42710"
            with psycopg.connect(database_url, autocommit=True) as sql:
                sql.execute("CREATE PUBLICATION p")
            options = {"proto_version": "1", "publication_names": "p"}
            await first.start_replication("busy", 0, options)
            with pytest.raises(ServerError, match="is active for PID") as info:
                await second.start_replication("busy", 0, options)
            assert info.value.sqlstate == "55006"
        finally:
            first.close()
            second.close()


async def _streaming(database_url: str, columns: str, insert: str) -> ReplicationConnection:
    """A connection streaming slot `s` (publication `p` of table `t`), `insert` committed."""
    conn = await ReplicationConnection.connect(database_url)
    try:
        await conn.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput")
        with psycopg.connect(database_url, autocommit=True) as sql:
            sql.execute(f"CREATE TABLE t ({columns})")
            sql.execute("CREATE PUBLICATION p FOR TABLE t")
            sql.execute(insert)
        await conn.start_replication("s", 0, {"proto_version": "1", "publication_names": "p"})
    except BaseException:
        conn.close()
        raise
    return conn


async def test_copy_both_keepalive_and_status(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await _streaming(database_url, "id int", "INSERT INTO t VALUES (1)")
        try:
            kinds = set()
            while b"w" not in kinds:
                data = await conn.read_copy()
                kinds.add(data[:1])
            # A status update asking for a reply is answered with a keepalive.
            await conn.send_copy(struct.pack("!BQQQqB", ord("r"), 0, 0, 0, 0, 1))
            while (await conn.read_copy())[:1] != b"k":
                pass
        finally:
            conn.close()


async def test_close_wakes_a_pending_read(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await ReplicationConnection.connect(database_url)
        await conn.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput")
        with psycopg.connect(database_url, autocommit=True) as sql:
            sql.execute("CREATE PUBLICATION p")
        await conn.start_replication("s", 0, {"proto_version": "1", "publication_names": "p"})

        async def read_forever() -> None:
            while True:
                await conn.read_copy()

        task = asyncio.create_task(read_forever())
        await asyncio.sleep(0.2)
        conn.close()
        with pytest.raises(ConnectionLost):
            await task


async def test_terminated_backend_is_connection_lost(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await ReplicationConnection.connect(database_url)
        try:
            await conn.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput")
            with psycopg.connect(database_url, autocommit=True) as sql:
                sql.execute("CREATE PUBLICATION p")
                await conn.start_replication(
                    "s", 0, {"proto_version": "1", "publication_names": "p"}
                )
                sql.execute("SELECT pg_terminate_backend(%s)", (conn.backend_pid,))
            with pytest.raises(ConnectionLost):
                while True:
                    await conn.read_copy()
        finally:
            conn.close()


async def test_connect_failure_is_connection_lost() -> None:
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ConnectionLost):
            await ReplicationConnection.connect("host=127.0.0.1 port=1 connect_timeout=2")


async def test_read_copies_nowait_takes_what_arrived_within_the_budget(database_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        conn = await _streaming(
            database_url,
            "id int, note text",
            "INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 50) AS i",
        )
        try:
            messages = [await conn.read_copy()]

            def kinds() -> set[bytes]:
                return {m[25:26] for m in messages if m[:1] == b"w"}

            while b"C" not in kinds():  # up to the transaction's commit
                taken = conn.read_copies_nowait(500)
                if not taken:
                    await asyncio.sleep(0.01)  # nothing arrived yet: never a wait inside
                    continue
                sizes = [len(m) for m in taken]
                # The budget stops the batch at the message that crosses it, not before.
                assert sum(sizes[:-1]) < 500
                messages += taken
            rows = [m for m in messages if m[:1] == b"w" and m[25:26] == b"I"]
            assert len(rows) == 50
            assert conn.read_copies_nowait(0) == []
        finally:
            conn.close()
