"""Routed events: what the gateway delivers, already addressed to one organization.

The routing layer (`walcast.routing`) builds these from the reader's items; hubs, history and
the Redis bus carry them unchanged. Immutable; a change event, made per change in the hot
path, is a NamedTuple.

An event carries its place as a key, ``(commit_lsn, position)``, and the history epoch; the
cursor string (`cdc.cursors`) is formatted only where it is sent, so a change no socket
receives is never formatted, and history and replays compare keys without parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from cdc.cursors import CursorKey, format_cursor
from gateway.config import TableConfig

__all__ = [
    "BROADCAST_PREFIX",
    "AccessRevoked",
    "BroadcastEvent",
    "ChangeEvent",
    "RoutedEvent",
]

BROADCAST_PREFIX = "walcast"
"""Logical messages with this prefix are custom broadcasts; others are ignored."""


class _Keyed:
    """What every routed event derives from its `key` and `epoch`: the cursor string, formatted
    only where a frame is sent, and the commit LSN."""

    __slots__ = ()
    key: CursorKey
    epoch: str

    @property
    def cursor(self) -> str:
        return format_cursor(self.key[0], self.key[1], self.epoch)

    @property
    def commit_lsn(self) -> int:
        return self.key[0]


class _ChangeFields(NamedTuple):
    organization_id: str | None  #: None: every organization (TRUNCATE has no rows to route by)
    key: CursorKey  #: (commit LSN, position in the transaction)
    epoch: str  #: the history epoch the cursor names
    commit_time: datetime
    table: TableConfig
    event_type: str  #: INSERT, UPDATE, DELETE or TRUNCATE
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    unchanged: tuple[str, ...]
    target_user: str | None  #: only this user receives it (userColumn)
    owner_id: str | None  #: the row's owner (ownerColumn), for show.or = "owner"
    #: The transaction's id (pgoutput's Begin; 0: unknown), by which a snapshot tells the
    #: changes it already reflects (`gateway.snapshot`).
    xid: int = 0


class ChangeEvent(_ChangeFields, _Keyed):
    """A row change for one organization (or every organization, for TRUNCATE). A NamedTuple
    rather than a frozen dataclass, like the reader's `RowChange`: one is made per change, and
    a frozen dataclass's `__init__` sets each of its twelve fields through `object.__setattr__`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class BroadcastEvent(_Keyed):
    """A custom event written with pg_logical_emit_message by the broadcast API."""

    organization_id: str
    key: CursorKey
    epoch: str
    event: str
    payload: orjson.Fragment  #: already serialized: a broadcast is sent as the API received it
    target_roles: frozenset[str]  #: empty: every member
    target_user: str | None


@dataclass(frozen=True, slots=True)
class AccessRevoked:
    """Access that ended: a member's roles changed or the member left, a session was deleted or
    ended by an UPDATE, or ``TRUNCATE member`` / ``TRUNCATE "session"`` (every field None)."""

    reason: str  #: "role-changed", "member-removed" or "session-revoked"
    organization_id: str | None
    user_id: str | None
    session_id: str | None
    commit_lsn: int
    committed_at: float  #: commit time, seconds since the epoch: older tickets are stale


RoutedEvent = ChangeEvent | BroadcastEvent
