"""Whether the history in Redis can go on, or a new epoch must begin: the rule, with no I/O.

Redis outlives databases: a dev database is re-created, a backup restored, another cluster put
behind the same ``REDIS_URL``, the slot re-created after PostgreSQL invalidated it. A history
kept for one of them must never be continued from another — its stream tops would make the
reader skip every new transaction below them as "already stored", and clients' cursors would
point at other transactions. So the ``{prefix}epoch`` stream records, per epoch, its id and the
database it belongs to (`cdc.identity.Identity`), and a starting reader continues the stored
history only when all of these hold:

    rule                                        when it fails, the history...
    an epoch is recorded                        was written by a walcast without epochs
    the identity is the same                    belongs to another database, timeline or slot
    floor <= the slot's position                begins after where the slot resends from:
                                                the database was restored from a backup
    the slot's position <= position             ends before where the slot resends from:
                                                the slot was re-created (or invalidated), so
                                                the changes in between are gone
    position <= the server's WAL position       reaches past the server's WAL: restored
                                                from a backup

A fresh Redis (nothing stored) begins the identity's own epoch; so does a Redis that lost its
data (restarted without persistence): the reader rebuilds the history from the slot's window
under the same id, and clients resume without a resync. Otherwise, a failed rule starts a new
epoch (`Decision.epoch`): never the id of the history it replaces, so no older cursor matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from cdc.cursors import CursorKey, is_epoch
from cdc.identity import Identity
from cdc.lsn import format_lsn

__all__ = ["Decision", "EpochRecord", "decide", "parse_record", "record_fields"]


class EpochRecord(NamedTuple):
    """The last entry of the ``{prefix}epoch`` stream."""

    entry_id: str
    epoch: str
    identity: Identity | None  #: None: not readable (written by something else)


def record_fields(epoch: str, identity: Identity, begins: int) -> dict[str, str]:
    """The fields of the entry that starts `epoch`."""
    return {"epoch": epoch, **identity.as_fields(), "begins": format_lsn(begins)}


def parse_record(reply: Sequence[Any]) -> EpochRecord | None:
    """The record in an ``XREVRANGE {prefix}epoch + - COUNT 1`` reply (None: no entry)."""
    if not reply:
        return None
    raw_id, raw_fields = reply[0]
    fields: Mapping[str, str] = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw_fields.items()
    }
    entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    epoch = fields.get("epoch", "")
    return EpochRecord(entry_id, epoch if is_epoch(epoch) else "", Identity.from_fields(fields))


class Decision(NamedTuple):
    epoch: str  #: the epoch the reader writes
    new: bool  #: a new epoch: drop the stored history (its streams), start at the slot
    reason: str  #: why a new one (empty when the history goes on, or Redis holds none)


def decide(
    record: EpochRecord | None,
    floor: CursorKey | None,
    position: CursorKey | None,
    identity: Identity,
    start_lsn: int,
    wal_end: int,
) -> Decision:
    """Continue the stored history, rebuild it under its own epoch, or start a new one (see the
    module docstring); `start_lsn` is where the slot resends from."""
    own = identity.epoch()
    if record is None:
        if floor is None and position is None:
            return Decision(own, True, "")  # a fresh Redis, or one that lost its data
        return Decision(own, True, "it holds a history without an epoch (an older walcast's)")
    if record.identity != identity or not record.epoch:
        if record.identity is None:
            differs = "an epoch record walcast cannot read"
        else:
            differs = "; ".join(identity.differences(record.identity)) or "its epoch id"
        reason = f"it holds the history of another database ({differs})"
        return Decision(_fresh(identity, record, start_lsn), True, reason)
    if floor is None:
        return Decision(record.epoch, False, "")  # lost the history, not the record: rebuild
    end = position or floor
    reason = ""
    if start_lsn < floor[0]:
        reason = (
            f"the slot resends from {format_lsn(start_lsn)}, before the history begins"
            f" ({format_lsn(floor[0])}): the database was restored from a backup?"
        )
    elif start_lsn > end[0]:
        reason = (
            f"the slot resends from {format_lsn(start_lsn)}, past the end of the history"
            f" ({format_lsn(end[0])}): the slot was re-created or invalidated since, so the"
            " changes in between are gone"
        )
    elif end[0] > wal_end:
        reason = (
            f"the history reaches {format_lsn(end[0])}, past the server's WAL"
            f" ({format_lsn(wal_end)}): the database was restored from a backup?"
        )
    if reason:
        return Decision(_fresh(identity, record, start_lsn), True, reason)
    return Decision(record.epoch, False, "")


def _fresh(identity: Identity, record: EpochRecord, start_lsn: int) -> str:
    """An epoch id for a history that begins anew: the identity's own, unless the history it
    replaces had that one."""
    own = identity.epoch()
    return own if own != record.epoch else identity.epoch(start_lsn)
