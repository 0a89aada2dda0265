"""The test harness gives a server that can do logical replication, and can restart it."""

from __future__ import annotations

import psycopg
import pytest

from tests.pg import PostgresServer


def test_server_has_logical_wal(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        (level,) = conn.execute("SHOW wal_level").fetchone()  # type: ignore[misc]
    assert level == "logical"


def test_restart_keeps_data(pg_server: PostgresServer, database_url: str) -> None:
    if not pg_server.can_restart:
        pytest.skip("external test server cannot be restarted")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pg_server.restart(mode="immediate")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
