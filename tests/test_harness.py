"""The test harness gives a server that can do logical replication, of the version asked for, and
can restart it the ways operators do."""

from __future__ import annotations

import os

import psycopg
import pytest

from tests.pg import OPTIONAL_TYPES, PostgresServer


def test_server_has_logical_wal(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        (level,) = conn.execute("SHOW wal_level").fetchone()  # type: ignore[misc]
    assert level == "logical"


def test_server_is_the_version_asked_for(pg_server: PostgresServer) -> None:
    """`WALCAST_TEST_PG=N` must give PostgreSQL N, never quietly the machine's default server."""
    asked = os.environ.get("WALCAST_TEST_PG")
    if not asked:
        pytest.skip("WALCAST_TEST_PG is not set: any version will do")
    assert pg_server.version_num // 10000 == int(asked)


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_restart_keeps_data(pg_server: PostgresServer, database_url: str, mode: str) -> None:
    if not pg_server.can_restart:
        pytest.skip("external test server cannot be restarted")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pg_server.restart(mode=mode)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_restart_names_a_shutdown_that_hangs(pg_server: PostgresServer) -> None:
    """A connection that never ends (like a walsender waiting for its client) holds a smart
    shutdown; the harness says so within its timeout instead of hanging the test run."""
    if not pg_server.can_restart or not pg_server.kind.startswith("local"):
        pytest.skip("needs an ephemeral local cluster")
    with psycopg.connect(pg_server.dsn, autocommit=True):
        with pytest.raises(RuntimeError, match="did not shut down within 1 s with -m smart"):
            pg_server.restart(mode="smart", timeout=1)
    pg_server.restart(mode="immediate")
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_xml_support_is_detected(pg_server: PostgresServer) -> None:
    """Builds without libxml (the server wheels) reject xml values; `lacks_type` must agree."""
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        try:
            conn.execute("CREATE TEMP TABLE probe (v xml)")
            conn.execute("INSERT INTO probe VALUES ('<a>b</a>')")
        except psycopg.errors.FeatureNotSupported:
            assert pg_server.lacks_type("xml") == OPTIONAL_TYPES["xml"][1]
        else:
            assert pg_server.lacks_type("xml") is None
