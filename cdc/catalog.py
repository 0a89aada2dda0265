"""What walcast asks of, and sets up in, the database: ordinary SQL on a normal connection.

Why it exists: the replication stream needs a publication, a slot, `wal_level = logical` and
(for routing deletes) `REPLICA IDENTITY FULL`; pgoutput names column types only by OID, so the
types it does not know are looked up here; and the slot's position and retained WAL are what the
metrics and `walcast check` report. Everything except `ensure_slot` runs on a
`psycopg.AsyncConnection` (a regular session); slots are made on the replication connection,
where `CREATE_REPLICATION_SLOT` is a walsender command.

The functions expect an autocommit connection: what they change is committed before they return.
Table names are qualified text, `"schema.table"` (a bare name means `public`); every identifier
that reaches SQL goes through `psycopg.sql`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.abc import Params

from cdc.changes import TypeDescription
from cdc.errors import ReplicationError
from cdc.lsn import parse_lsn
from cdc.transport import ReplicationConnection, ServerError

__all__ = [
    "SESSION_TABLES",
    "SlotStatus",
    "check_wal_level",
    "current_wal_lsn",
    "ensure_publication",
    "ensure_slot",
    "existing_tables",
    "fetch_types",
    "replica_identity_problems",
    "set_replica_identity_full",
    "slot_status",
    "split_name",
]

logger = logging.getLogger(__name__)

SESSION_TABLES = ("public.member", "public.session")
"""The session store's tables (spec §2, §6): always published when they exist."""

_FIRST_NORMAL_OID = 16384  # FirstNormalObjectId: OIDs below it are built into PostgreSQL
_DUPLICATE_OBJECT = "42710"
_PUBLISH = "insert, update, delete, truncate"
_PUBLICATION_QUERY = (
    "SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate"
    " FROM pg_publication WHERE pubname = %s"
)

AsyncConn = psycopg.AsyncConnection[Any]


def split_name(qualified: str) -> tuple[str, str]:
    """`"app.orders"` → `("app", "orders")`; a bare name is in `public`."""
    schema, _, table = qualified.rpartition(".")
    return schema or "public", table


def _table_sql(qualified: str) -> sql.Identifier:
    return sql.Identifier(*split_name(qualified))


async def _rows(
    conn: AsyncConn, query: LiteralString | sql.Composed, params: Params | None = None
) -> list[Any]:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


# -- prerequisites -----------------------------------------------------------------------------


async def check_wal_level(conn: AsyncConn) -> None:
    """Raise `ReplicationError`, saying how to fix it, unless `wal_level` is `logical`."""
    ((level,),) = await _rows(conn, "SHOW wal_level")
    if level != "logical":
        raise ReplicationError(
            f"PostgreSQL runs with wal_level = {level}; logical replication needs 'logical'. "
            "Run `ALTER SYSTEM SET wal_level = logical;` as a superuser, then restart PostgreSQL."
        )


async def existing_tables(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """The subset of `tables` (qualified names) that exist as tables, in the given order."""
    found = []
    for name in tables:
        schema, table = split_name(name)
        rows = await _rows(
            conn,
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, table),
        )
        if rows:
            found.append(f"{schema}.{table}")
    return found


async def replica_identity_problems(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """For each existing table not `REPLICA IDENTITY FULL`, the exact statement that fixes it.

    Returns:
        Lines like `ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;`, in table order.
    """
    fixes = []
    for name in tables:
        schema, table = split_name(name)
        rows = await _rows(
            conn,
            "SELECT c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, table),
        )
        if rows and rows[0][0] != "f":
            statement = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL;").format(_table_sql(name))
            fixes.append(statement.as_string(conn))
    return fixes


async def set_replica_identity_full(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """Set `REPLICA IDENTITY FULL` where missing; returns the tables changed (and logs them)."""
    changed = []
    for name in tables:
        if await replica_identity_problems(conn, [name]):
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(_table_sql(name))
                )
            logger.warning("set REPLICA IDENTITY FULL", extra={"table": name})
            changed.append(name)
    return changed


# -- publication and slot ----------------------------------------------------------------------


async def ensure_publication(conn: AsyncConn, name: str, tables: Sequence[str]) -> list[str]:
    """Create the publication, or bring its table list in step with `tables`.

    The session store's tables (`SESSION_TABLES`) are added when they exist. A publication
    `FOR ALL TABLES` is left as it is. Tables that do not exist are an error: they come from
    the realtime config, and a typo there must not go unnoticed.

    Returns:
        The qualified names the publication now covers.

    Raises:
        ReplicationError: a configured table does not exist.
    """
    wanted = list(dict.fromkeys(f"{s}.{t}" for s, t in map(split_name, tables)))
    present = await existing_tables(conn, wanted)
    missing = [table for table in wanted if table not in present]
    if missing:
        raise ReplicationError(f"tables in the realtime config do not exist: {', '.join(missing)}")
    for table in await existing_tables(conn, SESSION_TABLES):
        if table not in wanted:
            wanted.append(table)

    pub = sql.Identifier(name)
    rows = await _rows(conn, _PUBLICATION_QUERY, (name,))
    if not rows:
        query = sql.SQL("CREATE PUBLICATION {}").format(pub)
        if wanted:
            query += sql.SQL(" FOR TABLE {}").format(
                sql.SQL(", ").join(_table_sql(t) for t in wanted)
            )
        try:
            async with conn.transaction():
                await conn.execute(query)
            logger.info("created publication", extra={"publication": name, "tables": wanted})
            return wanted
        except psycopg.errors.DuplicateObject:
            rows = await _rows(conn, _PUBLICATION_QUERY, (name,))
    all_tables, publishes_everything = rows[0]
    if all_tables:
        logger.info("publication is FOR ALL TABLES; left as it is", extra={"publication": name})
        return wanted

    current_rows = await _rows(
        conn,
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (name,),
    )
    current = {f"{schema}.{table}" for schema, table in current_rows}
    async with conn.transaction():
        if set(wanted) != current:
            if wanted:
                await conn.execute(
                    sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                        pub, sql.SQL(", ").join(_table_sql(t) for t in wanted)
                    )
                )
            else:
                await conn.execute(
                    sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                        pub, sql.SQL(", ").join(_table_sql(t) for t in sorted(current))
                    )
                )
            logger.info(
                "updated publication tables",
                extra={
                    "publication": name,
                    "added": sorted(set(wanted) - current),
                    "removed": sorted(current - set(wanted)),
                },
            )
        if not publishes_everything:
            await conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
                    pub, sql.Literal(_PUBLISH)
                )
            )
    return wanted


async def ensure_slot(repl: ReplicationConnection, name: str) -> bool:
    """Create the logical slot (pgoutput) over a replication connection, unless it exists.

    Returns:
        True when the slot was created now.
    """
    try:
        await repl.simple_query(f"CREATE_REPLICATION_SLOT {_quote(name)} LOGICAL pgoutput")
    except ServerError as exc:
        if exc.sqlstate == _DUPLICATE_OBJECT:
            return False
        raise
    logger.info("created replication slot", extra={"slot": name})
    return True


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- types ---------------------------------------------------------------------------------------


async def fetch_types(conn: AsyncConn, oids: Iterable[int]) -> list[TypeDescription]:
    """Describe the types `oids` and every user-defined type they are built from.

    Element types of arrays, base types of domains and field types of composites are fetched
    too when they are user-defined (OID ≥ 16384), so one call resolves a whole type tree.
    Composite fields come in `attnum` order, dropped columns left out. Unknown OIDs are skipped.
    """
    wanted = list(dict.fromkeys(oids))
    seen: set[int] = set()
    found: dict[int, TypeDescription] = {}
    while wanted:
        batch = [oid for oid in wanted if oid not in seen]
        seen.update(batch)
        wanted = []
        if not batch:
            break
        rows = await _rows(
            conn,
            "SELECT t.oid::int8, n.nspname, t.typname, t.typtype,"
            " t.typbasetype::int8,"
            " CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0 END::int8,"
            " t.typarray::int8, t.typrelid::int8"
            " FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE t.oid = ANY(%s::oid[])",
            (batch,),
        )
        relids = [row[7] for row in rows if row[3] == "c" and row[7]]
        fields: dict[int, list[tuple[str, int]]] = {}
        if relids:
            for relid, attname, atttypid in await _rows(
                conn,
                "SELECT attrelid::int8, attname, atttypid::int8 FROM pg_attribute"
                " WHERE attrelid = ANY(%s::oid[]) AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attrelid, attnum",
                (relids,),
            ):
                fields.setdefault(relid, []).append((attname, atttypid))
        for oid, namespace, name, typtype, base, element, array, relid in rows:
            type_fields = tuple(fields.get(relid, ())) if typtype == "c" else ()
            found[oid] = TypeDescription(
                oid=oid,
                namespace=namespace,
                name=name,
                typtype=typtype,
                base_oid=base,
                element_oid=element,
                array_oid=array,
                fields=type_fields,
            )
            refs = [base, element, *(field_oid for _, field_oid in type_fields)]
            wanted.extend(ref for ref in refs if ref >= _FIRST_NORMAL_OID and ref not in seen)
    return list(found.values())


# -- positions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """Where a slot stands (from `pg_replication_slots`); byte counts are against the WAL end."""

    confirmed_flush_lsn: int | None  #: the position the client last confirmed
    restart_lsn: int | None  #: the oldest WAL the slot still needs
    retained_wal_bytes: int | None  #: pg_current_wal_lsn() - restart_lsn
    lag_bytes: int | None  #: pg_current_wal_lsn() - confirmed_flush_lsn
    active: bool
    active_pid: int | None


def _lsn(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


async def slot_status(conn: AsyncConn, slot: str) -> SlotStatus | None:
    """The slot's positions and retained WAL, or None when there is no such slot."""
    rows = await _rows(
        conn,
        "SELECT confirmed_flush_lsn::text, restart_lsn::text,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8,"
        " active, active_pid"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    if not rows:
        return None
    confirmed, restart, retained, lag, active, pid = rows[0]
    return SlotStatus(_lsn(confirmed), _lsn(restart), retained, lag, bool(active), pid)


async def current_wal_lsn(conn: AsyncConn) -> int:
    """The server's current WAL write position (`pg_current_wal_lsn()`)."""
    ((text,),) = await _rows(conn, "SELECT pg_current_wal_lsn()::text")
    return parse_lsn(text)
