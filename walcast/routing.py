"""Routing: typed changes + the realtime config → events addressed to one organization.

Pure: no I/O. For each row change of a configured table, the router decides which organization
receives it (`organizationColumn`), whether a single user is targeted (`userColumn`), who owns
the row (`ownerColumn`, for `show.or = "owner"`), and which roles may see it (`requiredRoles`).
Rows that move between organizations (or between targeted users) in an UPDATE become a DELETE
for the old audience and an INSERT for the new one, so the new row never reaches the old one.

It also turns changes of the session store's `member` and `session` tables into
`AccessRevoked` notices and logical messages with prefix `walcast` into broadcasts. A notice
names what it applies to (organization, user, session; None: any): a member whose role changed
or who left, a session deleted or ended by an UPDATE (it expires at or before the commit, or
its token changed), and every socket after ``TRUNCATE member`` or ``TRUNCATE "session"``.

Two rules fail closed:

* **Only walcast's own broadcasts.** Any database role may write a `walcast` message with
  `pg_logical_emit_message`; one without a valid signature (gateway.broadcasts) is dropped,
  counted (`walcast_forged_messages_total`) and logged at most once per interval, never with its
  content. A signed one is still refused if its event is reserved (`auth:`) or its namespace is
  not declared, and its `targetRoles` are bounded by the namespace as the API bounds them.
* **Only tables whose columns match the config.** The reader hands out a `TableColumns` item
  before a table's first row and again after its schema changes. If a column the config names
  (a masking key, `organizationColumn`, `userColumn`, `ownerColumn`, a `fields` entry) is gone,
  a RENAME or DROP while walcast runs, the table's events are withheld from everyone, counted
  (`walcast_withheld_events_total{table}`) and the fix is logged, until a later `TableColumns`
  shows the columns back. A mask on a column that is no longer there would otherwise let the
  renamed column through raw. The check runs once per `TableColumns`; the row path only looks
  the table up, as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import orjson

from cdc.changes import Item, LogicalMessage, RowChange, TableColumns, TransactionStart
from cdc.cursors import NO_EPOCH
from gateway.broadcasts import BroadcastSigner, namespace_roles, target_roles
from gateway.config import RealtimeConfig, TableConfig
from gateway.events import BROADCAST_PREFIX, AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent
from gateway.metrics import Metrics
from gateway.server import LOG_INTERVAL, Throttle

__all__ = ["Router"]

_route_row_change: Callable[..., list[RoutedEvent | AccessRevoked]] | None
try:
    from walcast._speedups import route_row_change as _route_row_change
except ImportError:  # built without a C compiler: `Router.route` routes every item
    _route_row_change = None

log = logging.getLogger(__name__)

#: `tuple.__new__(ChangeEvent, fields)`: the event without the NamedTuple's Python `__new__`
#: (230 of 540 ns per event); for the per-change path only, where all twelve fields are given.
_new_tuple = tuple.__new__

_MEMBER_TABLE = ("public", "member")
_SESSION_TABLE = ("public", "session")


class _TableRoute(NamedTuple):
    """What routing reads of a table's config, once per row: plain fields, not the
    pydantic model's attribute lookups."""

    table: TableConfig
    on_insert: bool
    on_update: bool
    on_delete: bool
    organization_column: str
    user_column: str | None
    owner_column: str | None

    @classmethod
    def of(cls, table: TableConfig) -> _TableRoute:
        return cls(
            table,
            table.onInsert,
            table.onUpdate,
            table.onDelete,
            table.organizationColumn,
            table.userColumn,
            table.ownerColumn,
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class Router:
    """Turns reader items into routed events; counts what it had to drop.

    Args:
        config: the realtime config.
        signer: verifies broadcast messages (keyed from `ACCESS_TOKEN`).
        metrics: where forged messages and withheld events are counted.
        clock: for spacing out the log lines about forged messages.
    """

    def __init__(
        self,
        config: RealtimeConfig,
        signer: BroadcastSigner,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._signer = signer
        self._metrics = metrics
        #: What the events of the transaction share: [commit time, transaction id, epoch].
        #: A list the C route reads too; `epoch` is set by the pipeline once it knows it.
        self._transaction: list[Any] = [None, 0, NO_EPOCH]
        #: The configured tables whose events flow (not withheld), with what routing reads.
        self._tables: dict[tuple[str, str], _TableRoute] = {}
        for table in config.tables.values():
            self._flow(table)
        #: Withheld tables → the config keys and columns found missing.
        self._withheld: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._forged_log = Throttle(LOG_INTERVAL, clock)
        self._forged_unlogged = 0
        self.dropped_null_organization = 0
        self.dropped_bad_broadcast = 0
        #: `route` for a `RowChange`: the common INSERT, UPDATE and DELETE in one C call
        #: (walcast/_speedups.c), anything else (or everything, without it) through `route`.
        self.route_change: Callable[[Item], list[RoutedEvent | AccessRevoked]] = (
            self.route
            if _route_row_change is None
            else partial(
                _route_row_change,
                (
                    self._tables,
                    self._transaction,
                    RowChange,
                    ChangeEvent,
                    ("INSERT", "DELETE", "UPDATE"),
                    self.route,
                ),
            )
        )

    @property
    def epoch(self) -> str:
        """The history epoch every cursor carries."""
        return str(self._transaction[2])

    @epoch.setter
    def epoch(self, epoch: str) -> None:
        self._transaction[2] = epoch

    def route(self, item: Item) -> list[RoutedEvent | AccessRevoked]:
        if type(item) is RowChange:
            key = (item.schema, item.table)
            route = self._tables.get(key)  # never the session store's tables: see `_flow`
            if route is not None:
                return self._row_change(item, route)
            if key == _MEMBER_TABLE:
                return self._member_change(item)
            if key == _SESSION_TABLE:
                return self._session_change(item)
            if key in self._withheld:
                self._metrics.withheld_events.labels(f"{item.schema}.{item.table}").inc()
            return []
        if isinstance(item, LogicalMessage):
            if item.prefix != BROADCAST_PREFIX:
                return []
            event = self._broadcast(item)
            return [event] if event is not None else []
        if isinstance(item, TransactionStart):
            self._transaction[:2] = item.commit_time, item.xid
        elif isinstance(item, TableColumns):
            self._check_columns(item)
        return []

    def _flow(self, table: TableConfig) -> None:
        """Let a configured table's events flow. The session store's tables are routed as
        access changes whatever the config says, so they are never in `_tables`."""
        key = (table.schema_name, table.table_name)
        if key != _MEMBER_TABLE and key != _SESSION_TABLE:
            self._tables[key] = _TableRoute.of(table)

    @property
    def withheld(self) -> frozenset[str]:
        """The tables whose events are withheld now, as "schema.table"."""
        return frozenset(f"{schema}.{table}" for schema, table in self._withheld)

    # -- the columns the config names --------------------------------------------------------

    def _check_columns(self, described: TableColumns) -> None:
        key = (described.schema, described.table)
        table = self._config.table(*key)
        if table is None:
            return
        present = set(described.columns)
        missing = tuple(
            (config_key, column)
            for config_key, columns in table.named_columns().items()
            for column in dict.fromkeys(columns)
            if column not in present
        )
        name = table.qualified_name
        if not missing:
            if self._withheld.pop(key, None) is not None:
                self._flow(table)
                log.info(
                    "table %s has every column the realtime config names again: its events"
                    " flow again (from %X)",
                    name,
                    described.commit_lsn,
                )
            return
        self._tables.pop(key, None)
        if self._withheld.get(key) == missing:
            return
        self._withheld[key] = missing
        named_by = [
            (column, f"masking.{column}" if config_key == "masking" else config_key)
            for config_key, column in missing
        ]
        log.error(
            "table %s: %s gone (renamed or dropped while walcast runs). Its events are withheld"
            " from every subscriber from %X on (counted in walcast_withheld_events_total)"
            " rather than sent without the mask or routing the config asks for. Fix: rename the"
            " column back, or make %s in the realtime config name the table's columns (now: %s)"
            " and restart walcast",
            name,
            ", ".join(f'column "{column}" (named by {key})' for column, key in named_by),
            described.commit_lsn,
            " and ".join(f'tables."{name}".{key}' for key in dict.fromkeys(k for _, k in named_by)),
            ", ".join(described.columns),
        )

    # -- row changes -----------------------------------------------------------------------

    def _row_change(
        self, change: RowChange, route: _TableRoute
    ) -> list[RoutedEvent | AccessRevoked]:
        table, on_insert, _, on_delete, org_column, user_column, owner_column = route
        kind, new, old = change.kind, change.new, change.old
        if kind == "INSERT":
            if not on_insert:
                return []
            row, old = new, None
        elif kind == "DELETE":
            if not on_delete:
                return []
            row, new = old, None
        elif kind == "UPDATE":
            return self._update(change, route)
        else:  # TRUNCATE: every organization's
            if not on_delete:
                return []
            return self._events(change, table, "TRUNCATE", None, None, None, None, None)
        # An INSERT or DELETE: one event for the row's organization.
        assert row is not None, "an INSERT has its new row, a DELETE its old one"
        org = _text(row.get(org_column))
        user = _text(row.get(user_column)) if user_column else None
        owner = _text(row.get(owner_column)) if owner_column else None
        return self._events(change, table, kind, org, new, old, user, owner)

    def _update(self, change: RowChange, route: _TableRoute) -> list[RoutedEvent | AccessRevoked]:
        """An UPDATE: one event, or a DELETE for the old audience and an INSERT for the new one
        when the row moves to another organization or targeted user.

        Without an old row (REPLICA IDENTITY DEFAULT and no key change) the routing columns are
        assumed unchanged, which is all PostgreSQL lets us know.
        """
        table, on_insert, on_update, on_delete, org_column, user_column, owner_column = route
        new, old = change.new, change.old
        assert new is not None
        before = old if old is not None and org_column in old else new
        new_org, old_org = _text(new.get(org_column)), _text(before.get(org_column))
        new_user = _text(new.get(user_column)) if user_column else None
        old_user = _text(before.get(user_column)) if user_column else None
        new_owner = _text(new.get(owner_column)) if owner_column else None
        old_owner = _text(before.get(owner_column)) if owner_column else None
        if new_org == old_org and new_user == old_user:
            if not on_update:
                return []
            # The owner sees raw values only if they own both versions of the row.
            owner = new_owner if new_owner == old_owner else None
            return self._events(change, table, "UPDATE", new_org, new, old, new_user, owner)
        routed: list[RoutedEvent | AccessRevoked] = []
        if on_delete:
            routed += self._events(
                change, table, "DELETE", old_org, None, old or new, old_user, old_owner
            )
        if on_insert:
            routed += self._events(change, table, "INSERT", new_org, new, None, new_user, new_owner)
        return routed

    def _events(
        self,
        change: RowChange,
        table: TableConfig,
        event_type: str,
        org: str | None,
        new: dict[str, Any] | None,
        old: dict[str, Any] | None,
        user: str | None,
        owner: str | None,
    ) -> list[RoutedEvent | AccessRevoked]:
        """The change's event for `org` (None: every organization, a TRUNCATE's), or none
        (counted) for a row with no organization."""
        if org is None and event_type != "TRUNCATE":
            self.dropped_null_organization += 1
            return []
        commit_time, xid, epoch = self._transaction
        assert commit_time is not None, "a RowChange always follows its TransactionStart"
        fields = (
            org,
            (change.commit_lsn, change.position),
            epoch,
            commit_time,
            table,
            event_type,
            new,
            old,
            change.unchanged,
            user,
            owner,
            xid,
        )
        return [_new_tuple(ChangeEvent, fields)]

    # -- the session store -----------------------------------------------------------------

    def _member_change(self, change: RowChange) -> list[RoutedEvent | AccessRevoked]:
        """A role changed, a member left or moved, or the table was emptied."""
        kind, old, new = change.kind, change.old, change.new
        if kind == "TRUNCATE":  # nobody is a member of anything any more
            return [self._revoked("member-removed", None, None, None, change)]
        if kind == "INSERT":
            return []
        if old is None or "userId" not in old:
            # No old row (the table is not REPLICA IDENTITY FULL, which walcast checks at
            # start): whether the role changed cannot be told, so assume it did.
            log.warning(
                "member %s without its old row: revoking; run ALTER TABLE member REPLICA"
                " IDENTITY FULL",
                kind,
            )
            row = new if kind == "UPDATE" and new is not None else {}
            org, user = _text(row.get("organizationId")), _text(row.get("userId"))
            reason = "role-changed" if kind == "UPDATE" else "member-removed"
            return [self._revoked(reason, org, user, None, change)]
        org, user = _text(old.get("organizationId")), _text(old.get("userId"))
        if kind == "DELETE" or new is None:
            reason = "member-removed"
        elif (_text(new.get("organizationId")), _text(new.get("userId"))) != (org, user):
            reason = "member-removed"
        elif new.get("role") != old.get("role"):
            reason = "role-changed"
        else:
            return []
        return [self._revoked(reason, org, user, None, change)]

    def _session_change(self, change: RowChange) -> list[RoutedEvent | AccessRevoked]:
        """A session deleted, expired or re-keyed by an UPDATE, or the table emptied."""
        kind, old, new = change.kind, change.old, change.new
        if kind == "TRUNCATE":  # every session is gone
            return [self._revoked("session-revoked", None, None, None, change)]
        if kind == "INSERT":
            return []
        if kind == "UPDATE" and new is not None and not self._session_ended(old, new):
            return []
        row = old if old is not None else new
        if row is None:
            return []
        session_id, user = _text(row.get("id")), _text(row.get("userId"))
        if session_id is None and user is None:
            return [self._revoked("session-revoked", None, None, None, change)]
        return [self._revoked("session-revoked", None, user, session_id, change)]

    def _session_ended(self, old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
        """Whether an UPDATE ends the session for the tickets it issued: it now expires at or
        before the commit, or its token, id or user changed."""
        if old is not None and any(
            _text(old.get(column)) != _text(new.get(column)) for column in ("token", "id", "userId")
        ):
            return True
        expires = new.get("expiresAt")
        if old is not None and expires == old.get("expiresAt"):
            return False
        commit_time = self._commit_time()
        if expires == "infinity":
            return False
        if isinstance(expires, str):
            try:
                expires = datetime.fromisoformat(expires)
            except ValueError:
                pass
        if not isinstance(expires, datetime):
            return True  # NULL, -infinity or unreadable: ended rather than trusted
        if expires.tzinfo is None:  # timestamp without time zone: Better Auth writes UTC
            expires = expires.replace(tzinfo=UTC)
        return expires <= commit_time

    def _revoked(
        self,
        reason: str,
        org: str | None,
        user: str | None,
        session_id: str | None,
        change: RowChange,
    ) -> AccessRevoked:
        return AccessRevoked(reason, org, user, session_id, change.commit_lsn, self._committed_at())

    def _committed_at(self) -> float:
        return self._commit_time().timestamp()

    def _commit_time(self) -> datetime:
        commit_time = self._transaction[0]
        assert isinstance(commit_time, datetime), "a RowChange always follows its TransactionStart"
        return commit_time

    # -- broadcasts ------------------------------------------------------------------------

    def _broadcast(self, message: LogicalMessage) -> BroadcastEvent | None:
        content = self._signer.verify(message.content)
        if content is None:
            self._forged(message)
            return None
        try:
            body = orjson.loads(content)
            org = body["organizationId"]
            name = body["event"]
            roles = body.get("targetRoles") or []
            user = body.get("targetUserId")
            if not (isinstance(org, str) and isinstance(name, str) and isinstance(roles, list)):
                raise TypeError("organizationId, event and targetRoles have the wrong types")
            payload = orjson.Fragment(orjson.dumps(body.get("payload", {})))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self._refused(message, f"malformed: {exc}")
            return None
        # The API checked all this before signing; a signed message breaking it means a bug
        # or a leaked ACCESS_TOKEN, and walcast's reserved events stay walcast's.
        required = namespace_roles(self._config, name)
        if isinstance(required, str):
            self._refused(message, required)
            return None
        bounded = target_roles(name.partition(":")[0], required, [str(r) for r in roles])
        if isinstance(bounded, str):
            self._refused(message, bounded)
            return None
        return BroadcastEvent(
            organization_id=org,
            key=(message.commit_lsn, message.position),
            epoch=self.epoch,
            event=name,
            payload=payload,
            target_roles=frozenset(bounded),
            target_user=_text(user),
        )

    def _refused(self, message: LogicalMessage, reason: str) -> None:
        self.dropped_bad_broadcast += 1
        self._metrics.dropped.labels("refused_broadcast").inc()
        log.warning("dropped a broadcast message at %X: %s", message.commit_lsn, reason)

    def _forged(self, message: LogicalMessage) -> None:
        """Count a message without a valid signature; log it, never its content, at most once
        per interval (whoever writes them chooses how many)."""
        self._metrics.forged_messages.inc()
        self._forged_unlogged += 1
        if not self._forged_log.due():
            return
        log.error(
            "dropped %d broadcast message(s) without a valid signature since the last report,"
            " the last at %X: a database role wrote them with pg_logical_emit_message, or a"
            " walcast node signs with an ACCESS_TOKEN secret this one does not accept (keep"
            " retired secrets configured for historySeconds after rotating)",
            self._forged_unlogged,
            message.commit_lsn,
        )
        self._forged_unlogged = 0
