"""What walcast needs of the database, as one ordered list of steps, each with its check and fix.

Why it exists: `walcast serve` (before it opens a port), `walcast check` (which changes nothing)
and the replication reader (at every connect) must agree on what "ready" means, and each problem
must be explained once, with the statement that fixes it. The steps, in order:

    step              check                                        fix (by `ensure`)
    wal_level         SHOW wal_level is 'logical'                  none: ALTER SYSTEM + restart
    role              the REPLICATION attribute (or superuser)     none: ALTER ROLE ... REPLICATION
    tables            every configured table exists                none: the config or the schema
    columns           every column the config names exists         none: the config or the schema
    replica identity  REPLICA IDENTITY FULL on the watched tables  ALTER TABLE, when managed
    publication       exists, covers the tables, publishes all     CREATE / ALTER PUBLICATION
    slot              a logical pgoutput slot of this database,    pg_create_logical_
                      not streaming to another process (when       replication_slot
                      `exclusive`)

`check()` runs every check and reports; `ensure()` runs every check, raises `SetupError` with
all problems found if there is any, else applies the fixes in order. A fix that needs a
privilege the role lacks is a problem of its check (naming the GRANT to run), not a failure
half-way through. Plain data in (`Requirements`): this module knows nothing of the realtime
config's format.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import psycopg
from psycopg import sql

from cdc import catalog
from cdc.catalog import SlotStatus, table_sql
from cdc.errors import ReplicationError

__all__ = [
    "STEPS",
    "Finding",
    "ReplicaIdentityMode",
    "Report",
    "Requirements",
    "SetupError",
    "SlotRecreated",
    "check",
    "ensure",
    "slot_in_use",
    "start_options",
    "wal_level_problem",
]

logger = logging.getLogger(__name__)

AsyncConn = psycopg.AsyncConnection[Any]
ReplicaIdentityMode = Literal["ignore", "check", "manage"]

SLOT_RELEASE_GRACE = 5.0
"""Seconds an exclusive start waits for an active slot to be released (its holder may be a
walcast that has just exited, whose server process has not noticed yet)."""


class SetupError(ReplicationError):
    """The database is not ready for walcast; the message says what to run."""


class SlotRecreated(ReplicationError):
    """The slot a reader was streaming from had to be created anew (dropped, or invalidated by
    PostgreSQL): what it held since the reader last confirmed is gone, so the history cannot
    go on; whoever keeps one starts it anew (a new epoch: older cursors resync)."""


@dataclass(frozen=True, slots=True)
class Requirements:
    """What walcast will stream, as plain data.

    Args:
        slot: the logical replication slot.
        publication: the publication.
        tables: qualified names ("schema.table") of the configured tables; None: the publication
            is managed elsewhere, so the tables, columns, replica identity and publication steps
            are skipped.
        columns: per configured table, the config key → the column names it refers to
            (e.g. `{"public.orders": {"organizationColumn": ("orgId",)}}`).
        replica_identity: for watched tables not `REPLICA IDENTITY FULL`: "check" is a
            problem (naming the `ALTER TABLE`), "manage" sets it, "ignore" accepts them.
        exclusive: the slot must not be streaming to another process (single-node `serve`).
    """

    slot: str = "walcast"
    publication: str = "walcast"
    tables: tuple[str, ...] | None = None
    columns: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    replica_identity: ReplicaIdentityMode = "check"
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class Finding:
    """What one step found."""

    step: str
    summary: str  #: one line for `walcast check`
    problems: tuple[str, ...] = ()  #: each says what is wrong and what to run
    pending: bool = False  #: the step's fix has work to do (and may do it)


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...]
    slot: SlotStatus | None  #: the slot after the fixes (`ensure`) or as found (`check`)
    watched: tuple[str, ...]  #: the tables the publication covers: configured + session store
    #: `ensure` created the slot: no history from before can continue on it (a new epoch).
    slot_created: bool = False
    #: Why `ensure` re-created the slot (PostgreSQL had invalidated it), else None.
    slot_invalidated: str | None = None

    @property
    def problems(self) -> list[str]:
        return [problem for finding in self.findings for problem in finding.problems]


@dataclass(slots=True)
class _Context:
    """What the steps learn, in order, for the steps after them and for the fixes."""

    conn: AsyncConn
    req: Requirements
    role: catalog.Role | None = None
    present: list[str] = field(default_factory=list)  # configured tables that exist
    watched: list[str] = field(default_factory=list)  # present + the session store's tables
    identity_todo: list[str] = field(default_factory=list)
    slot: SlotStatus | None = None
    slot_invalidated: str | None = None  # why the slot must be re-created (see `_check_slot`)
    slot_created: bool = False  # `_fix_slot` created the slot

    def quote(self, identifier: str) -> str:
        return sql.Identifier(identifier).as_string(self.conn)

    @property
    def role_name(self) -> str:
        assert self.role is not None
        return self.quote(self.role.name)


class Step(NamedTuple):
    name: str
    check: Callable[[_Context], Awaitable[Finding]]
    fix: Callable[[_Context], Awaitable[None]] | None
    needs_tables: bool  # skipped when `Requirements.tables` is None


# -- wal_level -----------------------------------------------------------------------------------


def wal_level_problem(level: str) -> str | None:
    """The problem with `wal_level = level`, or None when logical replication can run."""
    if level == "logical":
        return None
    return (
        f"PostgreSQL runs with wal_level = {level}; logical replication needs 'logical'. "
        "Run `ALTER SYSTEM SET wal_level = logical;` as a superuser, then restart PostgreSQL."
    )


async def _check_wal_level(ctx: _Context) -> Finding:
    level = await catalog.wal_level(ctx.conn)
    problem = wal_level_problem(level)
    return Finding("wal_level", f"wal_level: {level}", (problem,) if problem else ())


# -- role ----------------------------------------------------------------------------------------


async def _check_role(ctx: _Context) -> Finding:
    role = ctx.role = await catalog.role(ctx.conn)
    if role.superuser:
        return Finding("role", f"role {role.name}: superuser")
    if role.replication:
        return Finding("role", f"role {role.name}: REPLICATION")
    return Finding(
        "role",
        f"role {role.name}: no REPLICATION attribute",
        (
            f"role {ctx.role_name} lacks the REPLICATION attribute, which logical replication"
            f" needs (to create the slot and stream from it). Run as a superuser:"
            f" ALTER ROLE {ctx.role_name} REPLICATION;",
        ),
    )


# -- tables and columns --------------------------------------------------------------------------


async def _check_tables(ctx: _Context) -> Finding:
    assert ctx.req.tables is not None
    configured = list(dict.fromkeys(".".join(catalog.split_name(t)) for t in ctx.req.tables))
    ctx.present = await catalog.existing_tables(ctx.conn, configured)
    session = await catalog.existing_tables(ctx.conn, catalog.SESSION_TABLES)
    ctx.watched = ctx.present + [t for t in session if t not in ctx.present]
    missing = [name for name in configured if name not in ctx.present]
    return Finding(
        "tables",
        f"tables: {len(ctx.present)} of {len(configured)} configured tables exist",
        tuple(
            f"table {name} does not exist: fix its name in the realtime config, or create it"
            " (walcast cannot publish tables that do not exist)"
            for name in missing
        ),
    )


async def _check_columns(ctx: _Context) -> Finding:
    problems = []
    for table in ctx.present:
        named = ctx.req.columns.get(table, {})
        if not named:
            continue
        real = await catalog.table_columns(ctx.conn, table)
        for key, columns in named.items():
            missing = [c for c in dict.fromkeys(columns) if c not in real]
            if missing:
                noun = "column" if len(missing) == 1 else "columns"
                listed = ", ".join(f'"{c}"' for c in missing)
                problems.append(
                    f'tables."{table}".{key}: {table} has no {noun} {listed};'
                    f" its columns are: {', '.join(real)}"
                )
    summary = (
        "columns: every column the config names exists"
        if not problems
        else f"columns: {len(problems)} config key(s) name columns that do not exist"
    )
    return Finding("columns", summary, tuple(problems))


# -- replica identity ----------------------------------------------------------------------------


async def _check_replica_identity(ctx: _Context) -> Finding:
    mode = ctx.req.replica_identity
    statements = await catalog.replica_identity_problems(ctx.conn, ctx.watched)
    total = len(ctx.watched)
    summary = f"replica identity: FULL on {total - len(statements)} of {total} watched tables"
    if not statements or mode == "ignore":
        return Finding("replica identity", summary)
    fixes = "\n  ".join(statements)
    if mode == "check":
        return Finding(
            "replica identity",
            summary,
            (
                "walcast needs REPLICA IDENTITY FULL (old rows on UPDATE/DELETE, and the routing"
                f" columns of a DELETE). Run:\n  {fixes}\nor set manageReplicaIdentity = true in"
                " the realtime config.",
            ),
        )
    todo = [t for t in ctx.watched if await catalog.replica_identity_problems(ctx.conn, [t])]
    refused = await catalog.not_owned(ctx.conn, todo)
    if refused:
        return Finding(
            "replica identity",
            summary,
            (
                f"role {ctx.role_name} cannot set REPLICA IDENTITY FULL on"
                f" {', '.join(refused)}: only a table's owner can. Run as the owner:\n  {fixes}",
            ),
        )
    ctx.identity_todo = todo
    return Finding("replica identity", f"{summary} (serve sets it on the rest)", pending=True)


async def _fix_replica_identity(ctx: _Context) -> None:
    changed = await catalog.set_replica_identity_full(ctx.conn, ctx.identity_todo)
    logger.warning("set REPLICA IDENTITY FULL on %s", ", ".join(changed))


# -- publication ---------------------------------------------------------------------------------


async def _check_publication(ctx: _Context) -> Finding:
    name, wanted = ctx.req.publication, ctx.watched
    pub = ctx.quote(name)
    role = ctx.role
    assert role is not None
    found = await catalog.publication(ctx.conn, name)
    if found is not None and found.all_tables:
        return Finding("publication", f"publication {name}: FOR ALL TABLES")
    if found is not None and found.tables == set(wanted) and found.publishes_everything:
        return Finding("publication", f"publication {name}: covers the {len(wanted)} tables")

    create = sql.SQL("CREATE PUBLICATION {} FOR TABLE {};").format(
        sql.Identifier(name), sql.SQL(", ").join(table_sql(t) for t in wanted)
    )
    create_text = create.as_string(ctx.conn) if wanted else f"CREATE PUBLICATION {pub};"
    problems = []
    if found is None:
        summary = f"publication {name}: not created yet (serve creates it)"
        if not (role.superuser or role.create_in_database):
            database = ctx.quote(role.database)
            problems.append(
                f"role {ctx.role_name} may not create publication {pub}: that needs the CREATE"
                f" privilege on database {database}. Run as a superuser or the database owner:"
                f" GRANT CREATE ON DATABASE {database} TO {ctx.role_name}; (or create the"
                f" publication as the tables' owner: {create_text})"
            )
    else:
        behind = [t for t in wanted if t not in found.tables]
        summary = (
            f"publication {name}: covers {len(wanted) - len(behind)} of {len(wanted)} tables"
            + (f" (serve adds {', '.join(behind)} at start-up)" if behind else "")
        )
        if not found.owned:
            problems.append(
                f"publication {pub} must change (tables or operations it publishes) and role"
                f" {ctx.role_name} does not own it. Run as its owner:"
                f" ALTER PUBLICATION {pub} OWNER TO {ctx.role_name};"
            )
    adds_tables = found is None or found.tables != set(wanted)
    refused = await catalog.not_owned(ctx.conn, wanted) if adds_tables else []
    if refused:
        owner_fixes = " ".join(
            sql.SQL("ALTER TABLE {} OWNER TO {};")
            .format(table_sql(t), sql.Identifier(role.name))
            .as_string(ctx.conn)
            for t in refused
        )
        problems.append(
            f"role {ctx.role_name} must own the tables publication {pub} covers, and does not"
            f" own {', '.join(refused)}. Run as a superuser: {owner_fixes} (or create the"
            f" publication as their owner: {create_text})"
        )
    return Finding("publication", summary, tuple(problems), pending=not problems)


async def _fix_publication(ctx: _Context) -> None:
    await catalog.ensure_publication(ctx.conn, ctx.req.publication, ctx.present)


# -- slot ----------------------------------------------------------------------------------------


async def slot_in_use(conn: AsyncConn, slot: str, status: SlotStatus | None = None) -> str:
    """The message for a slot that another process streams from: who holds it, what to do."""
    status = status or await catalog.slot_status(conn, slot)
    pid = status.active_pid if status else None
    application = await catalog.application_name(conn, pid) if pid else None
    holder = f"pid {pid}" if pid else "another process"
    if application is not None:
        holder += f', application_name "{application}"' if application else ", no application_name"
    text = (
        f'replication slot "{slot}" is already streaming to another process ({holder}):'
        " another walcast on this database? Stop it, or give this one its own slot"
        " (--slot or WALCAST_SLOT)."
    )
    if pid:
        text += f" If that process is stale, end it: SELECT pg_terminate_backend({pid});"
    return text


async def _check_slot(ctx: _Context) -> Finding:
    req, role = ctx.req, ctx.role
    assert role is not None
    status = ctx.slot = await catalog.slot_status(ctx.conn, req.slot)
    if status is None:
        return Finding("slot", f"slot {req.slot}: not created yet (serve creates it)", pending=True)
    if status.invalidated and status.plugin == "pgoutput" and status.database == role.database:
        ctx.slot_invalidated = await _invalidation(ctx.conn, req.slot, status)
        return Finding(
            "slot",
            f"slot {req.slot}: invalidated by PostgreSQL (serve re-creates it). "
            + ctx.slot_invalidated,
            pending=True,
        )
    summary = (
        f"slot {req.slot}: active={status.active} "
        f"retained_wal_bytes={status.retained_wal_bytes} lag_bytes={status.lag_bytes}"
    )
    wrong = None
    if status.plugin is None:
        wrong = "is a physical slot"
    elif status.plugin != "pgoutput":
        wrong = f"uses the output plugin {status.plugin}"
    elif status.database != role.database:
        wrong = f"belongs to database {status.database}"
    if wrong:
        return Finding(
            "slot",
            summary,
            (
                f'replication slot "{req.slot}" {wrong}; walcast needs a logical slot with the'
                f" pgoutput plugin in database {role.database}. Give walcast another slot"
                f" (--slot or WALCAST_SLOT), or drop this one:"
                f" SELECT pg_drop_replication_slot('{req.slot}');",
            ),
        )
    if req.exclusive and status.active:
        status = await _released(ctx)
        if status is not None and status.active:
            return Finding("slot", summary, (await slot_in_use(ctx.conn, req.slot, status),))
    return Finding("slot", summary)


async def _released(ctx: _Context) -> SlotStatus | None:
    """The slot once no process streams from it, or as it is after `SLOT_RELEASE_GRACE`."""
    status = ctx.slot
    logger.info(
        "replication slot %s is active; waiting up to %.0fs for it to be released",
        ctx.req.slot,
        SLOT_RELEASE_GRACE,
    )
    with suppress(TimeoutError):
        async with asyncio.timeout(SLOT_RELEASE_GRACE):
            while status is not None and status.active:
                await asyncio.sleep(0.2)
                status = ctx.slot = await catalog.slot_status(ctx.conn, ctx.req.slot)
    return status


async def _invalidation(conn: AsyncConn, slot: str, status: SlotStatus) -> str:
    """Why PostgreSQL invalidated the slot, what that cost, and how to keep it from recurring."""
    reason = status.invalidation_reason
    found = f"wal_status = {status.wal_status}" + (
        f", invalidation_reason = {reason}" if reason else ""
    )
    if reason == "idle_timeout":
        timeout = await catalog.setting(conn, "idle_replication_slot_timeout")
        cause = (
            f"it stayed unused longer than idle_replication_slot_timeout ({timeout})."
            " To keep this from happening, raise idle_replication_slot_timeout and keep"
            " walcast running"
        )
    elif reason in (None, "wal_removed"):
        keep = await catalog.setting(conn, "max_slot_wal_keep_size")
        cause = (
            f"it held back more WAL than max_slot_wal_keep_size ({keep}) allows, while walcast"
            " was stopped or fell behind, so PostgreSQL removed WAL it still needed."
            " To keep this from happening, raise max_slot_wal_keep_size (ALTER SYSTEM SET"
            " max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); or -1 for no limit) and"
            " keep walcast running (restart it promptly: the slot retains WAL while it is down)"
        )
    else:
        cause = "see PostgreSQL's log for why. Keep walcast running"
    return (
        f'replication slot "{slot}" was invalidated by PostgreSQL ({found}): {cause}.'
        " Changes committed since walcast last read the slot cannot be delivered; walcast"
        " re-creates the slot and starts a new history epoch, so clients resuming from an older"
        " cursor get resync_required and must refetch their data."
    )


async def _fix_slot(ctx: _Context) -> None:
    if ctx.slot_invalidated is not None:
        logger.warning(ctx.slot_invalidated)
        await catalog.drop_slot(ctx.conn, ctx.req.slot)
    ctx.slot_created = await catalog.create_slot(ctx.conn, ctx.req.slot)


STEPS: tuple[Step, ...] = (
    Step("wal_level", _check_wal_level, None, needs_tables=False),
    Step("role", _check_role, None, needs_tables=False),
    Step("tables", _check_tables, None, needs_tables=True),
    Step("columns", _check_columns, None, needs_tables=True),
    Step("replica identity", _check_replica_identity, _fix_replica_identity, needs_tables=True),
    Step("publication", _check_publication, _fix_publication, needs_tables=True),
    Step("slot", _check_slot, _fix_slot, needs_tables=False),
)


# -- running the steps ---------------------------------------------------------------------------


async def _run(conn: AsyncConn, req: Requirements, *, apply: bool) -> Report:
    ctx = _Context(conn, req)
    steps = [step for step in STEPS if req.tables is not None or not step.needs_tables]
    checked = [(step, await step.check(ctx)) for step in steps]
    findings = tuple(finding for _, finding in checked)
    problems = [problem for finding in findings for problem in finding.problems]
    if apply:
        if problems:
            raise SetupError("\n".join(problems))
        for step, finding in checked:
            if finding.pending and step.fix is not None:
                try:
                    await step.fix(ctx)
                except psycopg.OperationalError:
                    raise  # the connection failed: worth retrying, not a set-up problem
                except psycopg.Error as exc:  # e.g. a privilege revoked since the check
                    raise SetupError(f"setting up the {step.name} failed: {exc}".strip()) from None
        ctx.slot = await catalog.slot_status(conn, req.slot)
    return Report(
        findings,
        ctx.slot,
        tuple(ctx.watched),
        slot_created=ctx.slot_created,
        slot_invalidated=ctx.slot_invalidated if ctx.slot_created else None,
    )


async def check(conn: AsyncConn, req: Requirements) -> Report:
    """Run every step's check, changing nothing; the report lists what each found."""
    return await _run(conn, req, apply=False)


async def ensure(conn: AsyncConn, req: Requirements) -> Report:
    """Check every step, then apply the fixes in order.

    Several processes may start at once (reader high availability, a restart): they set up one
    at a time, under an advisory lock named after the slot, so none trips over another's
    CREATE PUBLICATION or slot. `conn` must be in autocommit mode.

    Raises:
        SetupError: the problems found, each with the statement to run.
    """
    key = f"walcast:setup:{req.slot}"
    await conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
    try:
        return await _run(conn, req, apply=True)
    finally:
        if not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


def start_options(publication: str) -> dict[str, str]:
    """`START_REPLICATION` options: pgoutput protocol 1 (whole transactions, sent at commit),
    the publication, and logical messages (custom broadcasts)."""
    return {"proto_version": "1", "publication_names": publication, "messages": "true"}
