"""``snapshot=true``: the rows a socket may see now, then exactly the changes committed after.

The handoff, and why it has no gap and no double:

1. The socket is *held* from ``ready`` on (`gateway.hubs.Hub.register`): every event its hub
   handles from then on is collected for it, not sent.
2. Only then does the snapshot start: a read-only REPEATABLE READ transaction on the gateway's
   pool, whose ``pg_current_snapshot()`` (xmin, xmax, in-progress xids) is its visibility. A
   transaction committed after that moment has its commit reach the hub after step 1, so it
   is collected; one the snapshot sees was either handled before step 1 (and is reflected by
   the rows) or is collected and recognised by its xid (`Visibility.reflects`, pgoutput's
   Begin carries it) and dropped.
3. The rows are read through a cursor, in batches, yielding to the loop between batches; they
   are ``to_jsonb(row)`` (PostgreSQL's own values), checked against the subscription's filters
   and shaped by the same `TablePolicy` as live events (``fields``, masks, the owner rule).
4. Without an await: the ``snapshot`` frames, ``snapshot-complete``, the collected events the
   snapshot does not reflect, then the socket joins its group for live delivery.

Bounds: at most `max_rows` rows per snapshot (over it: an error frame naming the limit, no
rows, then live events as without a snapshot); at most `concurrency` snapshots at once per
node (the rest wait, held); frames of at most `FRAME_ROWS` rows or about `FRAME_BYTES` bytes.
A snapshot's rows are kept until its last one is read (so an over-limit one sends none):
memory is bounded by `max_rows`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import asyncpg

from cdc.render import RawJson, dumps
from gateway.config import RealtimeConfig, TableConfig
from gateway.events import ChangeEvent, RoutedEvent
from gateway.fanout import Connection
from gateway.hubs import Hub
from gateway.policy import PolicyCache
from gateway.protocol import system_frame, text_frame
from gateway.subscriptions import Subscription

__all__ = ["Snapshots", "Visibility", "column_types", "parse_row"]

log = logging.getLogger(__name__)

FRAME_ROWS = 500
FRAME_BYTES = 256 * 1024
_XID_SPACE = 1 << 32
_HALF = 1 << 31

_SESSION = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL IntervalStyle = 'postgres';"
    " SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'"
)
_SNAPSHOT = (
    "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,"
    " ARRAY(SELECT pg_snapshot_xip(s)::text) FROM pg_current_snapshot() AS s"
)
_COLUMNS = """
SELECT n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, NULL), t.typcategory
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND (n.nspname || '.' || c.relname) = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True)
class Visibility:
    """Which transactions a snapshot sees (``pg_current_snapshot()``), for 32-bit xids."""

    xmin: int  #: 64-bit (epoch and xid), as pg_snapshot gives them
    xmax: int
    in_progress: frozenset[int]

    def widen(self, xid: int) -> int:
        """The 64-bit id of a 32-bit `xid` near this snapshot (within 2^31 of its xmax)."""
        distance = (xid - self.xmax) % _XID_SPACE
        return self.xmax + distance if distance < _HALF else self.xmax - (_XID_SPACE - distance)

    def reflects(self, event: RoutedEvent) -> bool:
        """Whether the snapshot already shows `event`'s effect: a change whose transaction it
        sees as committed. Broadcasts, and changes of unknown xid, are never reflected."""
        if not isinstance(event, ChangeEvent) or event.xid == 0:
            return False
        full = self.widen(event.xid)
        return full < self.xmax and full not in self.in_progress


def parse_row(text: str) -> dict[str, object]:
    """``to_jsonb(row)::text`` as `cdc.changes` gives values: numbers keep their digits."""
    value = json.loads(text, parse_float=RawJson, parse_int=_integer)
    if not isinstance(value, dict):
        raise ValueError("to_jsonb(row) is not an object")
    return value


def _integer(text: str) -> object:
    return int(text) if len(text) < 19 else RawJson(text)  # orjson writes 64-bit ints only


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def column_types(
    pool: asyncpg.Pool, tables: Iterable[str]
) -> dict[str, dict[str, tuple[str, str]]]:
    """Per qualified table, its columns' (type name, type category)."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for table, column, type_name, category in await pool.fetch(_COLUMNS, list(tables)):
        found.setdefault(table, {})[column] = (type_name, category)
    return found


class Snapshots:
    """The snapshots of one node: how many at once, how many rows each."""

    def __init__(self, *, max_rows: int, concurrency: int) -> None:
        self.max_rows = max_rows
        self._slots = asyncio.Semaphore(concurrency)

    async def send(
        self,
        conn: Connection,
        hub: Hub,
        cursor: str,
        pool: asyncpg.Pool,
        config: RealtimeConfig,
        policies: PolicyCache,
    ) -> None:
        """Take the snapshot for held `conn`, send it, and release the socket to live events
        (see the module docstring). `cursor`: the position when it was held (its ``ready``'s),
        from which a resume gets every change the snapshot may not reflect. Database errors are
        logged and sent as an error frame, then live events follow as without a snapshot."""
        try:
            async with self._slots:
                if conn.closed:
                    return
                taken = await self._take(conn, pool, config, policies)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("snapshot failed: %s", type(exc).__name__)
            failed = {
                "message": "snapshot failed, reconnect to try again",
                "code": "snapshot-failed",
            }
            conn.write(system_frame("error", failed))
            taken = None
        if conn.closed:
            return
        if taken is None:
            hub.release(conn, lambda _event: False)
            return
        frames, visibility = taken
        if frames is None:
            conn.write(
                system_frame(
                    "error",
                    {
                        "message": f"snapshot over {self.max_rows} rows"
                        " (WALCAST_SNAPSHOT_MAX_ROWS): narrow it with tables= or filter=",
                        "code": "snapshot-too-large",
                        "limit": self.max_rows,
                    },
                )
            )
            hub.release(conn, lambda _event: False)
            return
        # From here on, no await: rows, snapshot-complete, what the snapshot does not reflect.
        for frame in frames:
            conn.write(frame)
        conn.write(system_frame("snapshot-complete", {"cursor": cursor}))
        hub.release(conn, visibility.reflects)

    async def _take(
        self,
        conn: Connection,
        pool: asyncpg.Pool,
        config: RealtimeConfig,
        policies: PolicyCache,
    ) -> tuple[list[bytes] | None, Visibility] | None:
        subscription = conn.subscription
        tables = [
            table
            for table in config.tables.values()
            if subscription.wants(table) and policies.get(table).allows(conn.roles)
        ]
        frames: list[bytes] = []
        rows = 0
        async with pool.acquire() as db, db.transaction(isolation="repeatable_read", readonly=True):
            await db.execute(_SESSION)
            xmin, xmax, xip = await db.fetchrow(_SNAPSHOT)
            visibility = Visibility(int(xmin), int(xmax), frozenset(int(x) for x in xip))
            for table in tables:
                batch: list[bytes] = []
                size = 0
                async for row in self._rows(db, table, conn, subscription, policies):
                    rows += 1
                    if rows > self.max_rows:
                        return None, visibility
                    batch.append(row)
                    size += len(row)
                    if len(batch) >= FRAME_ROWS or size >= FRAME_BYTES:
                        frames.append(_frame(table, batch))
                        batch, size = [], 0
                        await asyncio.sleep(0)
                        if conn.closed:
                            return None
                if batch:
                    frames.append(_frame(table, batch))
        return frames, visibility

    async def _rows(
        self,
        db: asyncpg.Connection,
        table: TableConfig,
        conn: Connection,
        subscription: Subscription,
        policies: PolicyCache,
    ) -> AsyncIterator[bytes]:
        policy = policies.get(table)
        # Identifiers come from the realtime config, quoted; values are parameters.
        relation = f"{_ident(table.schema_name)}.{_ident(table.table_name)}"
        org = _ident(table.organizationColumn)
        query = f"SELECT to_jsonb(t)::text FROM {relation} AS t WHERE t.{org}::text = $1"  # noqa: S608
        args: list[object] = [conn.organization_id]
        if table.userColumn:
            column = _ident(table.userColumn)
            query += f" AND (t.{column} IS NULL OR t.{column}::text = $2)"
            args.append(conn.user_id)
        raw = policy.raw_columns(conn.roles)
        owner_raw = policy.raw_columns(conn.roles, True)
        owner_column = table.ownerColumn if policy.has_owner_rule else None
        predicates = bool(subscription.predicates(table))
        async for record in db.cursor(query, *args, prefetch=FRAME_ROWS):
            row = parse_row(record[0])
            if predicates and not subscription.matches(table, row):
                continue
            visible = raw
            if owner_column is not None:
                owner = row.get(owner_column)
                if owner is not None and str(owner) == conn.user_id:
                    visible = owner_raw
            yield dumps(policy.shape(row, visible))


def _frame(table: TableConfig, rows: list[bytes]) -> bytes:
    head = dumps({"type": "snapshot", "table": table.table_name, "schema": table.schema_name})
    return text_frame(head[:-1] + b',"rows":[' + b",".join(rows) + b"]}")
