"""Shared fixtures: one PostgreSQL (wal_level=logical) per test session, a fresh database per test.

See tests/pg.py for where the server comes from (`WALCAST_TEST_PG=18` or
`WALCAST_TEST_PG_BINDIR` choose another version); the report header says which. Redis comes from
REDIS_URL (default redis://127.0.0.1:6379).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg import PostgresServer, describe_source, running_postgres

pytest_plugins = ["tests.fix_gateway", "tests.fix_redis"]


def pytest_report_header() -> str:
    return describe_source()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A DSN for an empty database of its own, dropped after the test."""
    with pg_server.fresh_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
