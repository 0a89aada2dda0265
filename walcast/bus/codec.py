"""The wire format of the Redis bus's stream entries: routed events in, the same events out.

An entry holds field ``e``: a JSON array of events, each an array (kind first: ``c`` change,
``b`` broadcast, ``r`` revocation). Rows travel unmasked with their values as `cdc.changes`
loaded them (masking stays on the nodes, once per visibility class, so Redis must be as private
as the database); a `RawJson` cell (numbers, json) is written as a string starting with NUL,
which no PostgreSQL text value can contain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson

from cdc.cursors import split_cursor
from cdc.render import tag_raw_json, untag_raw_json
from gateway.config import RealtimeConfig
from gateway.events import AccessRevoked, BroadcastEvent, ChangeEvent, RoutedEvent

__all__ = ["Event", "decode_events", "encode_events"]

log = logging.getLogger(__name__)

Event = RoutedEvent | AccessRevoked


def _encode_one(event: Event) -> list[Any]:
    if isinstance(event, ChangeEvent):
        table = event.table
        return [
            "c",
            event.organization_id,
            event.cursor,
            event.commit_lsn,
            event.commit_time.isoformat(),
            table.schema_name,
            table.table_name,
            event.event_type,
            event.new,
            event.old,
            list(event.unchanged),
            event.target_user,
            event.owner_id,
            event.xid,
        ]
    if isinstance(event, BroadcastEvent):
        return [
            "b",
            event.organization_id,
            event.cursor,
            event.commit_lsn,
            event.event,
            event.payload,
            sorted(event.target_roles),
            event.target_user,
        ]
    return [
        "r",
        event.reason,
        event.organization_id,
        event.user_id,
        event.session_id,
        event.commit_lsn,
        event.committed_at,
    ]


def encode_events(events: Iterable[Event]) -> bytes:
    return orjson.dumps(
        [_encode_one(event) for event in events],
        default=tag_raw_json,
        option=orjson.OPT_PASSTHROUGH_SUBCLASS,
    )


def decode_events(data: bytes, config: RealtimeConfig) -> list[Event]:
    """Events from one entry; a change of a table this node's config lacks is dropped."""
    tagged = b"\\u0000" in data
    events: list[Event] = []
    for item in orjson.loads(data):
        kind = item[0]
        if kind == "c":
            org, cursor, lsn, when, schema, name, event_type, new, old = item[1:10]
            unchanged, user, owner = item[10:13]
            xid = item[13] if len(item) > 13 else 0  # entries written before xids travelled
            place = split_cursor(cursor)
            table = config.table(schema, name)
            if place is None:
                log.warning("dropped an event with a malformed cursor %r", cursor)
                continue
            if table is None:
                log.warning("dropped an event of %s.%s: not in this node's config", schema, name)
                continue
            if tagged:
                new, old = untag_raw_json(new), untag_raw_json(old)
            events.append(
                ChangeEvent(
                    organization_id=org,
                    key=place[0],
                    epoch=place[1],
                    commit_time=datetime.fromisoformat(when),
                    table=table,
                    event_type=event_type,
                    new=new,
                    old=old,
                    unchanged=tuple(unchanged),
                    target_user=user,
                    owner_id=owner,
                    xid=xid,
                )
            )
        elif kind == "b":
            _, org, cursor, lsn, name, payload, roles, user = item
            place = split_cursor(cursor)
            if place is None:
                log.warning("dropped an event with a malformed cursor %r", cursor)
                continue
            events.append(
                BroadcastEvent(
                    organization_id=org,
                    key=place[0],
                    epoch=place[1],
                    event=name,
                    payload=orjson.Fragment(orjson.dumps(payload)),
                    target_roles=frozenset(roles),
                    target_user=user,
                )
            )
        elif kind == "r":
            _, reason, org, user, session, lsn, committed_at = item
            events.append(AccessRevoked(reason, org, user, session, lsn, committed_at))
    return events
