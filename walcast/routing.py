"""Routing: typed changes + the realtime config → events addressed to one organization.

Pure: no I/O. For each row change of a configured table, the router decides which organization
receives it (`organizationColumn`), whether a single user is targeted (`userColumn`), who owns
the row (`ownerColumn`, for `show.or = "owner"`), and which roles may see it (`requiredRoles`).
Rows that move between organizations (or between targeted users) in an UPDATE become a DELETE
for the old audience and an INSERT for the new one, so the new row never reaches the old one.

It also turns changes of the session store's `member` and `session` tables into
`AccessRevoked` notices (spec §6) and logical messages with prefix `walcast` into broadcasts.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import orjson

from cdc.changes import Item, LogicalMessage, RowChange, TransactionStart
from cdc.cursors import NO_EPOCH, format_cursor
from gateway.config import RealtimeConfig, TableConfig
from gateway.events import BROADCAST_PREFIX, AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent

__all__ = ["Router"]

log = logging.getLogger(__name__)

_MEMBER_TABLE = ("public", "member")
_SESSION_TABLE = ("public", "session")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class Router:
    """Turns reader items into routed events; counts what it had to drop."""

    def __init__(self, config: RealtimeConfig) -> None:
        self._config = config
        self._commit_time: datetime | None = None
        #: The history epoch every cursor carries (set by the pipeline once it knows it).
        self.epoch = NO_EPOCH
        self.dropped_null_organization = 0
        self.dropped_bad_broadcast = 0

    def route(self, item: Item) -> list[RoutedEvent | AccessRevoked]:
        if isinstance(item, RowChange):
            key = (item.schema, item.table)
            if key == _MEMBER_TABLE:
                return self._member_change(item)
            if key == _SESSION_TABLE:
                return self._session_change(item)
            table = self._config.table(item.schema, item.table)
            if table is None:
                return []
            return self._row_change(item, table)
        if isinstance(item, LogicalMessage):
            if item.prefix != BROADCAST_PREFIX:
                return []
            event = self._broadcast(item)
            return [event] if event is not None else []
        if isinstance(item, TransactionStart):
            self._commit_time = item.commit_time
        return []

    # -- row changes -----------------------------------------------------------------------

    def _row_change(
        self, change: RowChange, table: TableConfig
    ) -> list[RoutedEvent | AccessRevoked]:
        cursor = format_cursor(change.commit_lsn, change.position, self.epoch)
        commit_time = self._commit_time
        assert commit_time is not None, "a RowChange always follows its TransactionStart"

        def event(
            event_type: str,
            org: str | None,
            new: dict[str, Any] | None,
            old: dict[str, Any] | None,
            user: str | None,
            owner: str | None,
        ) -> ChangeEvent:
            return ChangeEvent(
                organization_id=org,
                cursor=cursor,
                commit_lsn=change.commit_lsn,
                commit_time=commit_time,
                table=table,
                event_type=event_type,
                new=new,
                old=old,
                unchanged=change.unchanged,
                target_user=user,
                owner_id=owner,
            )

        kind = change.kind
        if kind == "TRUNCATE":
            return [event("TRUNCATE", None, None, None, None, None)] if table.onDelete else []

        org_column, user_column, owner_column = (
            table.organizationColumn,
            table.userColumn,
            table.ownerColumn,
        )
        new, old = change.new, change.old
        if kind == "INSERT":
            if not table.onInsert:
                return []
            assert new is not None
            return self._with_org(
                event(
                    "INSERT",
                    _text(new.get(org_column)),
                    new,
                    None,
                    _text(new.get(user_column)) if user_column else None,
                    _text(new.get(owner_column)) if owner_column else None,
                )
            )
        if kind == "DELETE":
            if not table.onDelete:
                return []
            assert old is not None
            return self._with_org(
                event(
                    "DELETE",
                    _text(old.get(org_column)),
                    None,
                    old,
                    _text(old.get(user_column)) if user_column else None,
                    _text(old.get(owner_column)) if owner_column else None,
                )
            )
        # UPDATE: without an old row (REPLICA IDENTITY DEFAULT and no key change) the routing
        # columns are assumed unchanged, which is all PostgreSQL lets us know.
        assert new is not None
        before = old if old is not None and org_column in old else new
        new_org, old_org = _text(new.get(org_column)), _text(before.get(org_column))
        new_user = _text(new.get(user_column)) if user_column else None
        old_user = _text(before.get(user_column)) if user_column else None
        new_owner = _text(new.get(owner_column)) if owner_column else None
        old_owner = _text(before.get(owner_column)) if owner_column else None
        if new_org == old_org and new_user == old_user:
            if not table.onUpdate:
                return []
            # The owner sees raw values only if they own both versions of the row.
            owner = new_owner if new_owner == old_owner else None
            return self._with_org(event("UPDATE", new_org, new, old, new_user, owner))
        routed: list[RoutedEvent | AccessRevoked] = []
        if table.onDelete:
            routed += self._with_org(
                event("DELETE", old_org, None, old or new, old_user, old_owner)
            )
        if table.onInsert:
            routed += self._with_org(event("INSERT", new_org, new, None, new_user, new_owner))
        return routed

    def _with_org(self, event: ChangeEvent) -> list[RoutedEvent | AccessRevoked]:
        if event.organization_id is None:
            self.dropped_null_organization += 1
            return []
        return [event]

    # -- the session store -----------------------------------------------------------------

    def _member_change(self, change: RowChange) -> list[RoutedEvent | AccessRevoked]:
        old, new = change.old, change.new
        if old is None or change.kind not in ("UPDATE", "DELETE"):
            return []
        org, user = _text(old.get("organizationId")), _text(old.get("userId"))
        if change.kind == "DELETE":
            reason = "member-removed"
        elif new is None:
            return []
        elif (_text(new.get("organizationId")), _text(new.get("userId"))) != (org, user):
            reason = "member-removed"
        elif new.get("role") != old.get("role"):
            reason = "role-changed"
        else:
            return []
        return [AccessRevoked(reason, org, user, None, change.commit_lsn, self._committed_at())]

    def _session_change(self, change: RowChange) -> list[RoutedEvent | AccessRevoked]:
        if change.kind != "DELETE" or change.old is None:
            return []
        session_id = _text(change.old.get("id"))
        user = _text(change.old.get("userId"))
        return [
            AccessRevoked(
                "session-revoked", None, user, session_id, change.commit_lsn, self._committed_at()
            )
        ]

    def _committed_at(self) -> float:
        assert self._commit_time is not None, "a RowChange always follows its TransactionStart"
        return self._commit_time.timestamp()

    # -- broadcasts ------------------------------------------------------------------------

    def _broadcast(self, message: LogicalMessage) -> BroadcastEvent | None:
        try:
            body = orjson.loads(message.content)
            org = body["organizationId"]
            name = body["event"]
            roles = body.get("targetRoles") or []
            user = body.get("targetUserId")
            if not (isinstance(org, str) and isinstance(name, str) and isinstance(roles, list)):
                raise TypeError("organizationId, event and targetRoles have the wrong types")
            payload = orjson.Fragment(orjson.dumps(body.get("payload", {})))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.dropped_bad_broadcast += 1
            log.warning("dropped a malformed broadcast message at %X: %s", message.commit_lsn, exc)
            return None
        return BroadcastEvent(
            organization_id=org,
            cursor=format_cursor(message.commit_lsn, message.position, self.epoch),
            commit_lsn=message.commit_lsn,
            event=name,
            payload=payload,
            target_roles=frozenset(str(role) for role in roles),
            target_user=_text(user),
        )
