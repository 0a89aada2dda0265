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
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
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
        self._xid = 0
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
            self._xid = item.xid
        return []

    # -- row changes -----------------------------------------------------------------------

    def _row_change(
        self, change: RowChange, table: TableConfig
    ) -> list[RoutedEvent | AccessRevoked]:
        cursor = format_cursor(change.commit_lsn, change.position, self.epoch)
        commit_time = self._commit_time
        assert commit_time is not None, "a RowChange always follows its TransactionStart"
        xid = self._xid

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
                xid=xid,
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
        commit_time = self._commit_time
        assert commit_time is not None, "a RowChange always follows its TransactionStart"
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
