"""cdc.setup, `walcast check` and `serve`'s start-up: each misconfiguration named, with its fix.

`check` changes nothing and exits 1 listing the problems; `serve` refuses to start with exit
status 2 and the same words on stderr, never a traceback. The roles these tests make are
cluster-wide: each has a random name and is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc import catalog, setup
from cdc.setup import Requirements, SetupError
from gateway.config import Settings, parse_realtime_config
from gateway.metrics import Metrics
from tests.fix_gateway import ACCESS_TOKEN, clean_env, free_port, walcast_command
from tests.fix_serve import run_walcast, wait_ready
from walcast.cli import apply_migrations
from walcast.pipeline import DropSink, Pipeline, setup_requirements

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE applications (
    id text PRIMARY KEY, "organizationId" text NOT NULL, stage text, ssn text
);
ALTER TABLE applications REPLICA IDENTITY FULL;
"""

CONFIG = """
[tables."public.applications"]
[tables."public.applications".masking]
ssn = { type = "ssn", show = { roles = ["owner"] } }
"""


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def prepared(dsn: str, tmp_path: Path, config: str = CONFIG) -> dict[str, str]:
    """Session store and schema in the database; the environment `walcast` runs with."""
    apply_migrations(dsn)
    execute(dsn, SCHEMA)
    path = tmp_path / "realtime.toml"
    path.write_text(config, encoding="utf-8")
    return clean_env(
        DATABASE_URL=dsn,
        ACCESS_TOKEN=ACCESS_TOKEN,
        WALCAST_CONFIG=str(path),
        WALCAST_PORT=str(free_port()),
    )


def refused(result: subprocess.CompletedProcess[str], *lines: str) -> None:
    """`serve` stopped before opening a port: exit 2, each line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for line in lines:
        assert line in result.stderr, (line, result.stderr)


def problems(result: subprocess.CompletedProcess[str], *lines: str) -> None:
    """`check` found problems: exit 1, each line reported, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for line in lines:
        assert f"problem: {line}" in result.stdout, (line, result.stdout)


@contextlib.contextmanager
def role(dsn: str, *attributes: str) -> Iterator[tuple[str, str]]:
    """A new login role (name, DSN as that role), dropped with what it owns afterwards."""
    name = f"walcast_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    execute(dsn, f"CREATE ROLE {name} LOGIN PASSWORD '{password}' {' '.join(attributes)}")
    try:
        yield name, psycopg.conninfo.make_conninfo(dsn, user=name, password=password)
    finally:
        execute(dsn, f"DROP OWNED BY {name}", f"DROP ROLE {name}")


def own_every_table(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        for (table,) in tables:
            conn.execute(f"ALTER TABLE public.{table} OWNER TO {name}".encode())


# -- the wording, without a server ---------------------------------------------------------------


def test_wal_level_problem_says_how_to_fix_it() -> None:
    assert setup.wal_level_problem("logical") is None
    assert setup.wal_level_problem("replica") == (
        "PostgreSQL runs with wal_level = replica; logical replication needs 'logical'. "
        "Run `ALTER SYSTEM SET wal_level = logical;` as a superuser, then restart PostgreSQL."
    )


def test_every_step_has_a_check_and_fixes_are_where_walcast_may_act() -> None:
    assert [step.name for step in setup.STEPS] == [
        "wal_level",
        "role",
        "tables",
        "columns",
        "replica identity",
        "publication",
        "slot",
    ]
    fixable = {step.name for step in setup.STEPS if step.fix is not None}
    assert fixable == {"replica identity", "publication", "slot"}


# -- one path: check reports, ensure sets up -----------------------------------------------------


async def test_check_changes_nothing_and_ensure_sets_everything_up(database_url: str) -> None:
    execute(
        database_url,
        SCHEMA,
        'CREATE TABLE plain (id int PRIMARY KEY, "organizationId" text)',
    )
    requirements = Requirements(
        tables=("public.applications", "plain"),
        columns={"public.applications": {"organizationColumn": ("organizationId",)}},
        replica_identity="manage",
    )
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        report = await setup.check(conn, requirements)
        assert report.problems == []
        assert [f.summary for f in report.findings] == [
            "wal_level: logical",
            "role postgres: superuser",
            "tables: 2 of 2 configured tables exist",
            "columns: every column the config names exists",
            "replica identity: FULL on 1 of 2 watched tables (serve sets it on the rest)",
            "publication walcast: not created yet (serve creates it)",
            "slot walcast: not created yet (serve creates it)",
        ]
        assert await catalog.slot_status(conn, "walcast") is None  # check made nothing
        assert await catalog.publication(conn, "walcast") is None

        report = await setup.ensure(conn, requirements)
        assert report.slot is not None and report.slot.plugin == "pgoutput"
        assert report.watched == ("public.applications", "public.plain")
        publication = await catalog.publication(conn, "walcast")
        assert publication is not None
        assert publication.tables == {"public.applications", "public.plain"}
        assert await catalog.replica_identity_problems(conn, ["plain"]) == []

        again = await setup.check(conn, requirements)
        assert again.problems == [] and not any(f.pending for f in again.findings)


@pytest.mark.parametrize(
    ("create", "wrong"),
    [
        (
            "pg_create_logical_replication_slot('walcast', 'test_decoding')",
            "uses the output plugin test_decoding",
        ),
        ("pg_create_physical_replication_slot('walcast')", "is a physical slot"),
    ],
    ids=["test_decoding", "physical"],
)
async def test_slot_of_another_kind_is_named(database_url: str, create: str, wrong: str) -> None:
    try:
        execute(database_url, f"SELECT {create}")
    except psycopg.errors.UndefinedFile:
        pytest.skip("this PostgreSQL build has no test_decoding plugin (contrib)")
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            with pytest.raises(SetupError) as info:
                await setup.ensure(conn, Requirements())
    finally:  # a physical slot belongs to no database: it would outlive this test's database
        execute(database_url, "SELECT pg_drop_replication_slot('walcast')")
    database = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    assert str(info.value) == (
        f'replication slot "walcast" {wrong}; walcast needs a'
        f" logical slot with the pgoutput plugin in database {database}. Give walcast another"
        " slot (--slot or WALCAST_SLOT), or drop this one:"
        " SELECT pg_drop_replication_slot('walcast');"
    )


# -- columns the config names --------------------------------------------------------------------


def test_config_columns_that_do_not_exist(database_url: str, tmp_path: Path) -> None:
    env = prepared(
        database_url,
        tmp_path,
        """
[tables."public.applications"]
organizationColumn = "orgId"
userColumn = "assigneeId"
fields = ["id", "stage", "notes", "score"]
[tables."public.applications".masking]
ssn = { type = "ssn" }
email = { type = "email" }
""",
    )
    columns = "its columns are: id, organizationId, stage, ssn"
    expected = [
        f'tables."public.applications".organizationColumn: public.applications has no column'
        f' "orgId"; {columns}',
        f'tables."public.applications".userColumn: public.applications has no column'
        f' "assigneeId"; {columns}',
        f'tables."public.applications".fields: public.applications has no columns'
        f' "notes", "score"; {columns}',
        f'tables."public.applications".masking: public.applications has no column'
        f' "email"; {columns}',
    ]
    result = run_walcast("check", env=env)
    problems(result, *expected)
    assert result.stdout.strip().endswith("4 problem(s)")
    refused(run_walcast("serve", env=env), *expected)


# -- privileges ----------------------------------------------------------------------------------


def test_role_without_replication(database_url: str, tmp_path: Path) -> None:
    env = prepared(database_url, tmp_path)
    with role(database_url) as (name, dsn):
        own_every_table(database_url, name)
        execute(database_url, f'GRANT CREATE ON DATABASE "{_dbname(database_url)}" TO {name}')
        env = {**env, "DATABASE_URL": dsn}
        expected = (
            f'role "{name}" lacks the REPLICATION attribute, which logical replication needs'
            " (to create the slot and stream from it). Run as a superuser:"
            f' ALTER ROLE "{name}" REPLICATION;'
        )
        result = run_walcast("check", env=env)
        problems(result, expected)
        assert f"role {name}: no REPLICATION attribute" in result.stdout
        assert result.stdout.strip().endswith("1 problem(s)")
        refused(run_walcast("serve", env=env), expected)


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


async def test_role_that_may_not_create_the_publication(database_url: str, tmp_path: Path) -> None:
    env = prepared(database_url, tmp_path)
    database = _dbname(database_url)
    with role(database_url, "REPLICATION") as (name, dsn):
        own_every_table(database_url, name)
        env = {**env, "DATABASE_URL": dsn}
        expected = (
            f'role "{name}" may not create publication "walcast": that needs the CREATE'
            f' privilege on database "{database}". Run as a superuser or the database owner:'
            f' GRANT CREATE ON DATABASE "{database}" TO "{name}"; (or create the publication'
            ' as the tables\' owner: CREATE PUBLICATION "walcast" FOR TABLE'
            ' "public"."applications", "public"."member", "public"."session";)'
        )
        result = run_walcast("check", env=env)
        problems(result, expected)
        assert result.stdout.strip().endswith("1 problem(s)")
        refused(run_walcast("serve", env=env), expected)

        # The statement it names is the fix: then serve's set-up goes through.
        execute(database_url, f'GRANT CREATE ON DATABASE "{database}" TO "{name}"')
        result = run_walcast("check", env=env)
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout
        settings = Settings(database_url=dsn, access_tokens=(ACCESS_TOKEN,))
        config = parse_realtime_config(_toml(CONFIG))
        pipeline = Pipeline(settings, config, DropSink(), Metrics(), on_ready=lambda _: None)
        await pipeline.prepare(exclusive=True)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            publication = await catalog.publication(conn, "walcast")
            assert publication is not None and "public.applications" in publication.tables
            assert await catalog.slot_status(conn, "walcast") is not None


def test_role_that_does_not_own_the_tables(database_url: str, tmp_path: Path) -> None:
    env = prepared(database_url, tmp_path)
    database = _dbname(database_url)
    with role(database_url, "REPLICATION") as (name, dsn):
        execute(database_url, f'GRANT CREATE ON DATABASE "{database}" TO {name}')
        env = {**env, "DATABASE_URL": dsn}
        expected = (
            f'role "{name}" must own the tables publication "walcast" covers, and does not own'
            " public.applications, public.member, public.session. Run as a superuser:"
            f' ALTER TABLE "public"."applications" OWNER TO "{name}";'
            f' ALTER TABLE "public"."member" OWNER TO "{name}";'
            f' ALTER TABLE "public"."session" OWNER TO "{name}";'
            ' (or create the publication as their owner: CREATE PUBLICATION "walcast" FOR'
            ' TABLE "public"."applications", "public"."member", "public"."session";)'
        )
        problems(run_walcast("check", env=env), expected)
        refused(run_walcast("serve", env=env), expected)


# -- a slot that is already streaming ------------------------------------------------------------


async def test_second_serve_on_a_streaming_slot_exits_2_naming_the_holder(
    database_url: str, tmp_path: Path
) -> None:
    env = prepared(database_url, tmp_path)
    first = await asyncio.create_subprocess_exec(
        *walcast_command(),
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{env['WALCAST_PORT']}")
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT s.active_pid, a.application_name FROM pg_replication_slots s"
                " JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = 'walcast'"
            ).fetchone()
        assert row is not None
        pid, application = row
        assert application == "walcast"  # walcast names its replication sessions

        started = time.monotonic()
        other = {**env, "WALCAST_PORT": str(free_port())}
        second = await asyncio.to_thread(run_walcast, "serve", env=other)
        refused(
            second,
            f'walcast: replication slot "walcast" is already streaming to another process'
            f' (pid {pid}, application_name "walcast"): another walcast on this database?'
            " Stop it, or give this one its own slot (--slot or WALCAST_SLOT). If that process"
            f" is stale, end it: SELECT pg_terminate_backend({pid});",
        )
        assert "replication stream interrupted" not in second.stderr
        assert time.monotonic() - started < setup.SLOT_RELEASE_GRACE + 20
        assert first.returncode is None  # the first one streams on
    finally:
        first.terminate()
        await asyncio.wait_for(first.wait(), 10)


def test_requirements_follow_the_config() -> None:
    config = parse_realtime_config(
        _toml(
            """
manageReplicaIdentity = true
[tables.orders]
organizationColumn = "org"
ownerColumn = "owner"
fields = ["id", "org"]
[tables.orders.masking]
card = { type = "creditCard", show = { or = "owner" } }
[tables."app.notes"]
userColumn = "userId"
"""
        )
    )
    settings = Settings(slot="s1", publication="p1")
    assert setup_requirements(settings, config, exclusive=True) == Requirements(
        slot="s1",
        publication="p1",
        tables=("public.orders", "app.notes"),
        columns={
            "public.orders": {
                "organizationColumn": ("org",),
                "ownerColumn": ("owner",),
                "fields": ("id", "org"),
                "masking": ("card",),
            },
            "app.notes": {"organizationColumn": ("organizationId",), "userColumn": ("userId",)},
        },
        replica_identity="manage",
        exclusive=True,
    )


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)
