"""The type matrix through the real replication stream: every event's `new` and `old`, rendered
by walcast, equals PostgreSQL's `to_jsonb(row)` of the same row (numbers compared by digits). Types
a server may be built without (xml) are parts of their own, skipped where the server lacks them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import cdc.runs
from cdc.changes import ChangeBuilder, RowChange, TransactionEnd
from cdc.reader import ReplicationReader
from cdc.render import dumps
from tests.pg import PostgresServer
from tests.test_changes import MATRIX_PARTS, SCHEMA, _exact, _parse, matrix_part

pytestmark = pytest.mark.integration


def _snapshot(conn: psycopg.Connection[Any]) -> dict[int, Any]:
    conn.execute("SET TimeZone = 'UTC'")
    rows = conn.execute("SELECT id, to_jsonb(m)::text FROM matrix m ORDER BY id").fetchall()
    return {row_id: _exact(_parse(doc)) for row_id, doc in rows}


@pytest.mark.parametrize("path", ["runs", "general"])
@pytest.mark.parametrize("part", MATRIX_PARTS)
async def test_new_and_old_equal_to_jsonb(
    pg_server: PostgresServer,
    database_url: str,
    part: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The row changes are typed by the reader's runs in C (cdc.runs), or, as without the C
    # extension, each by the general path: this oracle checks the values of both.
    if path == "general":
        monkeypatch.setattr(cdc.runs, "_change_run", None)
    elif cdc.runs._change_run is None:
        pytest.skip("cdc._speedups was not built (no C compiler)")
    general = [
        _counting(monkeypatch, ChangeBuilder, name)
        for name in ("_on_insert", "_on_update", "_on_delete")
    ]
    matrix = matrix_part(pg_server, part)
    nrows = max(len(values) for _, _, values in matrix) + 1  # and a row of NULLs
    names = ", ".join(f'"{name}"' for name, _, _ in matrix)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        columns = ", ".join(f'"{name}" {sqltype}' for name, sqltype, _ in matrix)
        conn.execute(f"CREATE TABLE matrix (id int PRIMARY KEY, {columns})")
        conn.execute("ALTER TABLE matrix REPLICA IDENTITY FULL")
        conn.execute("CREATE PUBLICATION walcast FOR TABLE matrix")
        conn.execute("SELECT pg_create_logical_replication_slot('walcast', 'pgoutput')")
        with conn.transaction():
            for i in range(nrows):
                literals = ", ".join(
                    f"({values[i]})::{sqltype}" if i < len(values) else "NULL"
                    for _, sqltype, values in matrix
                )
                conn.execute(f"INSERT INTO matrix (id, {names}) VALUES ({i}, {literals})")
        inserted = _snapshot(conn)
        conn.execute("UPDATE matrix SET id = id + 100")
        updated = _snapshot(conn)
        conn.execute("DELETE FROM matrix")

    reader = ReplicationReader(database_url, tables=["public.matrix"])
    changes: list[RowChange] = []
    transactions = 0
    async with asyncio.timeout(60):
        async for item in reader.items():
            if isinstance(item, RowChange):
                changes.append(item)
            elif isinstance(item, TransactionEnd):
                transactions += 1
                if transactions == 3:
                    break
    await reader.aclose()

    def rendered(row: dict[str, Any] | None) -> Any:
        assert row is not None
        return _exact(_parse(dumps(row)))

    kinds = [change.kind for change in changes]
    assert kinds == ["INSERT"] * nrows + ["UPDATE"] * nrows + ["DELETE"] * nrows
    assert [count() for count in general] == [0 if path == "runs" else nrows] * 3
    for change in changes[:nrows]:
        new = rendered(change.new)
        assert new == inserted[_id(new)]
    for change in changes[nrows : 2 * nrows]:
        new, old = rendered(change.new), rendered(change.old)
        assert new == updated[_id(new)]
        assert old == inserted[_id(old)]
    for change in changes[2 * nrows :]:
        assert change.new is None
        old = rendered(change.old)
        assert old == updated[_id(old)]


def _counting(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> Callable[[], int]:
    """Count calls of `cls.name` from now on; returns the count so far."""
    calls = 0
    method = getattr(cls, name)

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return method(*args)

    monkeypatch.setattr(cls, name, counted)
    return lambda: calls


def _id(row: dict[str, Any]) -> int:
    value = row["id"]
    return int(value[1]) if isinstance(value, tuple) else int(value)
