"""What walcast asks of, and sets up in, the database: ordinary SQL on a normal connection.

Why it exists: the replication stream needs a publication, a slot, `wal_level = logical` and
(for routing deletes) `REPLICA IDENTITY FULL`; pgoutput names column types only by OID, so the
types it does not know are looked up here; and the slot's position and retained WAL are what the
metrics and `walcast check` report. These are the queries; `cdc.setup` decides, in one ordered
list of steps, which of them set-up runs and words every fix. Everything runs on a
`psycopg.AsyncConnection` (a regular session).

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
from cdc.lsn import parse_lsn

__all__ = [
    "SESSION_TABLES",
    "Publication",
    "Role",
    "SlotStatus",
    "application_name",
    "create_slot",
    "current_wal_lsn",
    "drop_slot",
    "ensure_publication",
    "existing_tables",
    "fetch_types",
    "not_owned",
    "publication",
    "replica_identity_problems",
    "role",
    "set_replica_identity_full",
    "setting",
    "slot_status",
    "split_name",
    "table_columns",
    "table_sql",
    "wal_level",
]

logger = logging.getLogger(__name__)

SESSION_TABLES = ("public.member", "public.session")
"""The session store's tables: always published when they exist (walcast watches them for
access changes and never delivers them to clients)."""

_FIRST_NORMAL_OID = 16384  # FirstNormalObjectId: OIDs below it are built into PostgreSQL
_PUBLISH = "insert, update, delete, truncate"

AsyncConn = psycopg.AsyncConnection[Any]


def split_name(qualified: str) -> tuple[str, str]:
    """`"app.orders"` → `("app", "orders")`; a bare name is in `public`."""
    schema, _, table = qualified.rpartition(".")
    return schema or "public", table


def table_sql(qualified: str) -> sql.Identifier:
    """A qualified table name as a quoted SQL identifier (`"public"."orders"`)."""
    return sql.Identifier(*split_name(qualified))


async def _rows(
    conn: AsyncConn, query: LiteralString | sql.Composed, params: Params | None = None
) -> list[Any]:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def _relation(
    conn: AsyncConn, qualified: str, select: LiteralString, *, tables_only: bool
) -> Any:
    """`select`, an expression over the relation's pg_class row `c`, for the relation named
    `qualified` (with `tables_only`, a table or partitioned table); None when there is none."""
    schema, name = split_name(qualified)
    kinds: LiteralString = " AND c.relkind IN ('r', 'p')" if tables_only else ""
    query = sql.SQL(
        "SELECT {} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s{}"
    ).format(sql.SQL(select), sql.SQL(kinds))
    rows = await _rows(conn, query, (schema, name))
    return rows[0][0] if rows else None


# -- prerequisites -----------------------------------------------------------------------------


async def setting(conn: AsyncConn, name: str) -> str | None:
    """A server setting's current value as `SHOW` gives it; None when the server has none."""
    ((value,),) = await _rows(conn, "SELECT current_setting(%s, true)", (name,))
    return value


async def wal_level(conn: AsyncConn) -> str:
    """The server's `wal_level` (logical replication needs `logical`)."""
    ((level,),) = await _rows(conn, "SHOW wal_level")
    return str(level)


@dataclass(frozen=True, slots=True)
class Role:
    """The connected role and what it may do in the connected database."""

    name: str
    database: str
    superuser: bool
    replication: bool  #: the REPLICATION attribute: create slots, stream from them
    create_in_database: bool  #: CREATE on the database: create publications


async def role(conn: AsyncConn) -> Role:
    """Who walcast connects as, and the privileges set-up needs."""
    ((name, database, superuser, replication, create),) = await _rows(
        conn,
        "SELECT current_user, current_database(), r.rolsuper, r.rolreplication,"
        " has_database_privilege(current_database(), 'CREATE')"
        " FROM pg_roles r WHERE r.rolname = current_user",
    )
    return Role(name, database, bool(superuser), bool(replication), bool(create))


async def existing_tables(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """The subset of `tables` (qualified names) that exist as tables, in the given order."""
    found = []
    for name in tables:
        if await _relation(conn, name, "true", tables_only=True):
            schema, table = split_name(name)
            found.append(f"{schema}.{table}")
    return found


async def table_columns(conn: AsyncConn, table: str) -> list[str]:
    """The columns of `table` (qualified name), in their order; empty when there is no table."""
    schema, name = split_name(table)
    rows = await _rows(
        conn,
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, name),
    )
    return [row[0] for row in rows]


async def not_owned(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """The tables the connected role may not alter: it neither owns them nor has their owner's
    privileges (superusers own everything)."""
    refused = []
    for name in tables:
        may_alter = await _relation(
            conn, name, "pg_has_role(current_user, c.relowner, 'USAGE')", tables_only=False
        )
        if may_alter is False:
            refused.append(name)
    return refused


async def replica_identity_problems(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """For each existing table not `REPLICA IDENTITY FULL`, the exact statement that fixes it.

    Returns:
        Lines like `ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;`, in table order.
    """
    fixes = []
    for name in tables:
        identity = await _relation(conn, name, "c.relreplident", tables_only=True)
        if identity is not None and identity != "f":
            statement = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL;").format(table_sql(name))
            fixes.append(statement.as_string(conn))
    return fixes


async def set_replica_identity_full(conn: AsyncConn, tables: Iterable[str]) -> list[str]:
    """Set `REPLICA IDENTITY FULL` where missing; returns the tables changed (and logs them)."""
    changed = []
    for name in tables:
        if await replica_identity_problems(conn, [name]):
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table_sql(name))
                )
            logger.warning("set REPLICA IDENTITY FULL", extra={"table": name})
            changed.append(name)
    return changed


# -- publication and slot ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publication:
    """An existing publication, as set-up sees it."""

    all_tables: bool  #: FOR ALL TABLES
    publishes_everything: bool  #: insert, update, delete and truncate
    tables: frozenset[str]  #: the qualified tables it covers (when not FOR ALL TABLES)
    owned: bool  #: the connected role may alter it


async def publication(conn: AsyncConn, name: str) -> Publication | None:
    """The publication `name`, or None when there is none."""
    rows = await _rows(
        conn,
        "SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate,"
        " pg_has_role(current_user, pubowner, 'USAGE')"
        " FROM pg_publication WHERE pubname = %s",
        (name,),
    )
    if not rows:
        return None
    all_tables, everything, owned = rows[0]
    current = await _rows(
        conn,
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (name,),
    )
    tables = frozenset(f"{schema}.{table}" for schema, table in current)
    return Publication(bool(all_tables), bool(everything), tables, bool(owned))


async def ensure_publication(conn: AsyncConn, name: str, tables: Sequence[str]) -> list[str]:
    """Create the publication, or bring its table list in step with `tables`.

    The session store's tables (`SESSION_TABLES`) are added when they exist. A publication
    `FOR ALL TABLES` is left as it is. The tables must exist (`cdc.setup` checks that first).

    Returns:
        The qualified names the publication now covers.
    """
    wanted = list(dict.fromkeys(f"{s}.{t}" for s, t in map(split_name, tables)))
    for table in await existing_tables(conn, SESSION_TABLES):
        if table not in wanted:
            wanted.append(table)

    pub = sql.Identifier(name)
    found = await publication(conn, name)
    if found is None:
        query = sql.SQL("CREATE PUBLICATION {}").format(pub)
        if wanted:
            query += sql.SQL(" FOR TABLE {}").format(
                sql.SQL(", ").join(table_sql(t) for t in wanted)
            )
        try:
            async with conn.transaction():
                await conn.execute(query)
            logger.info("created publication", extra={"publication": name, "tables": wanted})
            return wanted
        except psycopg.errors.DuplicateObject:
            found = await publication(conn, name)
            assert found is not None
    if found.all_tables:
        logger.info("publication is FOR ALL TABLES; left as it is", extra={"publication": name})
        return wanted

    current = found.tables
    async with conn.transaction():
        if set(wanted) != current:
            if wanted:
                await conn.execute(
                    sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                        pub, sql.SQL(", ").join(table_sql(t) for t in wanted)
                    )
                )
            else:
                await conn.execute(
                    sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                        pub, sql.SQL(", ").join(table_sql(t) for t in sorted(current))
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
        if not found.publishes_everything:
            await conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
                    pub, sql.Literal(_PUBLISH)
                )
            )
    return wanted


async def create_slot(conn: AsyncConn, name: str) -> bool:
    """Create the logical slot (pgoutput), unless it exists; True when it was created now.

    The one way walcast makes its slot: `pg_create_logical_replication_slot`, on a regular
    session (the role needs the REPLICATION attribute).
    """
    try:
        await _rows(
            conn, "SELECT 1 FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (name,)
        )
    except psycopg.errors.DuplicateObject:
        return False
    logger.info("created replication slot", extra={"slot": name})
    return True


async def drop_slot(conn: AsyncConn, name: str) -> None:
    """Drop the slot (it must not be active); nothing when it does not exist."""
    try:
        await _rows(conn, "SELECT pg_drop_replication_slot(%s)", (name,))
    except psycopg.errors.UndefinedObject:
        return
    logger.info("dropped replication slot", extra={"slot": name})


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
    active_pid: int | None  #: the walsender streaming from it, while active
    plugin: str | None = None  #: the output plugin; None for a physical slot
    database: str | None = None  #: the database a logical slot belongs to
    wal_status: str | None = None  #: reserved, extended, unreserved, or lost
    #: Why PostgreSQL invalidated the slot (17+: e.g. wal_removed), None while it is usable.
    invalidation_reason: str | None = None

    @property
    def invalidated(self) -> bool:
        """PostgreSQL invalidated the slot: it can never stream again (its WAL is gone)."""
        return self.wal_status == "lost" or self.invalidation_reason is not None


def _lsn(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


async def slot_status(conn: AsyncConn, slot: str) -> SlotStatus | None:
    """The slot's positions and retained WAL, or None when there is no such slot."""
    rows = await _rows(
        conn,
        "SELECT confirmed_flush_lsn::text, restart_lsn::text,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8,"
        " active, active_pid, plugin, database, wal_status,"
        # invalidation_reason exists from PostgreSQL 17 on: read through jsonb to need no
        # version check (NULL before 17, and while the slot is usable).
        " to_jsonb(s) ->> 'invalidation_reason'"
        " FROM pg_replication_slots s WHERE slot_name = %s",
        (slot,),
    )
    if not rows:
        return None
    confirmed, restart, retained, lag, active, pid, plugin, database, wal, reason = rows[0]
    return SlotStatus(
        _lsn(confirmed),
        _lsn(restart),
        retained,
        lag,
        bool(active),
        pid,
        plugin,
        database,
        wal,
        reason,
    )


async def application_name(conn: AsyncConn, pid: int) -> str | None:
    """The `application_name` of the server process `pid` (None: gone, or not visible)."""
    rows = await _rows(conn, "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,))
    return rows[0][0] if rows else None


async def current_wal_lsn(conn: AsyncConn) -> int:
    """The server's current WAL write position (`pg_current_wal_lsn()`)."""
    ((text,),) = await _rows(conn, "SELECT pg_current_wal_lsn()::text")
    return parse_lsn(text)
