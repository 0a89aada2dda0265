"""A history entry: one routed event kept as one `bytes` object, and the event again.

`gateway.history.MemoryHistory` keeps every event of the node this way: bytes hold no
references, so the garbage collector neither tracks nor walks them, and one object per event
costs a few hundred bytes for a 200-byte row. The layout:

* a fixed header (`HEADER`, little-endian): commit LSN and position (the event's key), the
  time it was kept, the commit time (µs since the Unix epoch, UTC), the transaction id, a
  context id (table and epoch, which the history numbers), and two masks;
* the rest, JSON: a change's `event[5:11]` (type, new, old, unchanged, user, owner), or a
  broadcast's event name, payload, roles and user.

Rows are kept as plain JSON, which orjson writes without calling back into Python: the masks
say which values of the new and the old row are `RawJson` (`raw_json_mask`), and reading an
entry types them again (`restore_raw_json`). A row the masks cannot describe (an array or
composite value, which may hold RawJson inside, or over 63 columns) and every broadcast are
kept with tagged values instead (`cdc.render.tag_raw_json`); the new-row mask then says
`TAGGED`. Both ways an event comes back exactly as it was kept, each value of its type
(tests/test_entries.py).

`change_entry` is in C (`gateway._speedups`) when the extension was built: one call per
change, the same bytes as its Python twin `change_entry_py`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import orjson

from cdc.cursors import CursorKey
from cdc.render import RawJson, tag_raw_json, untag_raw_json
from gateway.config import TableConfig
from gateway.events import BroadcastEvent, ChangeEvent, RoutedEvent

__all__ = [
    "CODEC",
    "HEADER",
    "TAGGED",
    "broadcast_entry",
    "change_entry",
    "change_entry_py",
    "entry_key",
    "event_of",
    "kept_at",
    "micros_of",
    "raw_json_mask",
    "raw_json_mask_py",
    "restore_raw_json",
]

HEADER = struct.Struct("<QQdqQIQQ")
"""Commit LSN, position, kept at, commit time (µs), transaction id, context, the new row's
mask (or `TAGGED`), the old row's mask."""

TAGGED = 2**64 - 1
"""The new-row mask of an entry whose body marks its `RawJson` values itself."""

_KEY = struct.Struct("<QQ")
_KEPT_AT = struct.Struct("<d")
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: A change's entry holds `event[5:11]` as its JSON body: one slice of the tuple.
assert ChangeEvent._fields[5:11] == (
    "event_type",
    "new",
    "old",
    "unchanged",
    "target_user",
    "owner_id",
), "an entry's body is decoded in this order"

_tagged_dumps = partial(
    orjson.dumps, default=tag_raw_json, option=orjson.OPT_PASSTHROUGH_SUBCLASS
)  #: OPT_PASSTHROUGH_SUBCLASS: a `RawJson` goes to `tag_raw_json`

Codec = tuple[type, Callable[[Any], bytes], Callable[[Any], bytes]]
"""The class masked as raw JSON, and the plain and the tagged JSON writer."""

CODEC: Codec = (
    RawJson,
    orjson.dumps,
    _tagged_dumps,
)
"""What `change_entry` is given: the class it masks, and the plain and the tagged writer."""

_PLAIN = frozenset({str, int, float, bool, type(None)})


def raw_json_mask_py(row: dict[str, Any] | None, raw_json: type) -> int:
    """Which of a typed row's values are `raw_json`, as bits by position (bit i: the i-th).

    0 for None; -1 when bits cannot say it all: not a dict, more than 63 values, or a value
    other than str, int, float, bool, None or `raw_json`. `gateway._speedups.raw_json_mask`
    is the same function in C.
    """
    if row is None:
        return 0
    if type(row) is not dict or len(row) > 63:
        return -1
    mask = 0
    for i, value in enumerate(row.values()):
        kind = type(value)
        if kind is raw_json:
            mask |= 1 << i
        elif kind not in _PLAIN:
            return -1
    return mask


def restore_raw_json(row: dict[str, Any] | None, mask: int) -> dict[str, Any] | None:
    """The inverse of `raw_json_mask` over the row read back from plain JSON."""
    if not mask or row is None:
        return row
    return {
        name: RawJson(value) if mask >> i & 1 else value
        for i, (name, value) in enumerate(row.items())
    }


def change_entry_py(
    event: ChangeEvent,
    now: float,
    micros: int,
    context: int,
    codec: Codec,
) -> bytes:
    """The entry of a change kept at `now`, whose commit time is `micros` and context id
    `context`. `gateway._speedups.change_entry` is the same function in C."""
    raw_json, dumps, tagged_dumps = codec
    key = event.key
    new_mask = raw_json_mask_py(event.new, raw_json)
    old_mask = raw_json_mask_py(event.old, raw_json)
    if new_mask < 0 or old_mask < 0:  # the body marks its RawJson values itself
        new_mask, old_mask, dumps = TAGGED, 0, tagged_dumps
    header = HEADER.pack(key[0], key[1], now, micros, event.xid, context, new_mask, old_mask)
    return header + dumps(event[5:11])


def broadcast_entry(event: BroadcastEvent, now: float, context: int) -> bytes:
    key = event.key
    header = HEADER.pack(key[0], key[1], now, 0, 0, context, TAGGED, 0)
    body = [event.event, event.payload, sorted(event.target_roles), event.target_user]
    return header + _tagged_dumps(body)


def event_of(
    entry: bytes,
    organization_id: str | None,
    contexts: Sequence[tuple[TableConfig | None, str]],
) -> RoutedEvent:
    """The event an entry holds; `contexts`: (table, or None for a broadcast, and epoch) by id."""
    lsn, position, _, micros, xid, context, new_mask, old_mask = HEADER.unpack_from(entry)
    table, epoch = contexts[context]
    body = orjson.loads(memoryview(entry)[HEADER.size :])
    if table is None:
        name, payload, roles, user = body
        assert organization_id is not None, "a broadcast names its organization"
        return BroadcastEvent(
            organization_id,
            (lsn, position),
            epoch,
            name,
            orjson.Fragment(orjson.dumps(payload)),
            frozenset(roles),
            user,
        )
    event_type, new, old, unchanged, user, owner = body
    if new_mask != TAGGED:
        new, old = restore_raw_json(new, new_mask), restore_raw_json(old, old_mask)
    elif entry.find(b"\\u0000", HEADER.size) >= 0:  # a RawJson cell: restore its kind
        new, old = untag_raw_json(new), untag_raw_json(old)
    return ChangeEvent(
        organization_id,
        (lsn, position),
        epoch,
        _UTC_EPOCH + timedelta(microseconds=micros),
        table,
        event_type,
        new,
        old,
        tuple(unchanged),
        user,
        owner,
        xid,
    )


entry_key = cast(Callable[[bytes], CursorKey], _KEY.unpack_from)
"""An entry's key (commit LSN, position): struct's own method, with no Python frame, as an
eviction from a full history reads two keys per event."""


def kept_at(entry: bytes) -> float:
    return _KEPT_AT.unpack_from(entry, 16)[0]


def micros_of(when: datetime) -> int:
    """`when` as µs since the Unix epoch."""
    since = when - _UTC_EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


raw_json_mask: Callable[[dict[str, Any] | None, type], int]
change_entry: Callable[
    [ChangeEvent, float, int, int, Codec],
    bytes,
]
try:
    from gateway._speedups import change_entry, raw_json_mask
except ImportError:  # built without a C compiler: the same in Python
    change_entry, raw_json_mask = change_entry_py, raw_json_mask_py
