"""Which database a history belongs to, and the epoch id that names it.

Why it exists: a cursor is an LSN, and an LSN only means something in the WAL it came from.
A history kept across walcast restarts (in Redis) or a cursor kept by a client may outlive the
database it came from: a re-created database, a restored backup, a new cluster behind the same
URL, a re-created or invalidated slot. Every history is therefore tied to an `Identity` —
the system identifier, the timeline, the database (name and OID) and the slot — and named by
an epoch id derived from it (`Identity.epoch`), which every cursor carries (`cdc.cursors`).

* **Stable for the same database.** The id is a hash of the identity, so a walcast that
  restarts against the same database and slot computes the same id, with nothing stored: a
  client's cursor from before the restart still resumes.
* **A slot re-created in the same database** has the same identity. Its LSNs go on from the
  old ones (an LSN never repeats in one cluster and timeline), so a history that begins at the
  new slot's position puts every older cursor below its start: those resync. Where the old
  history is kept (Redis), the new one also gets an id of its own: `epoch(birth)` mixes in the
  LSN where it began, so no cursor of the old one can ever match it.
* **Anything else** (another system identifier, timeline, database or slot name) is another
  epoch id.

The identity comes from `IDENTIFY_SYSTEM` on a replication connection (system identifier,
timeline, database name) and the catalog (the database's OID, which changes when a database
of the same name is created anew).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

from cdc.cursors import EPOCH_LENGTH
from cdc.errors import ReplicationError
from cdc.lsn import parse_lsn
from cdc.transport import ReplicationConnection

__all__ = ["Identity", "identify"]

_LABELS = {
    "system": "system identifier",
    "timeline": "timeline",
    "database": "database",
    "database_oid": "database OID",
    "slot": "slot",
}


@dataclass(frozen=True, slots=True)
class Identity:
    """The database a history belongs to (see the module docstring)."""

    system: str  #: the cluster's system identifier (decimal, as the server reports it)
    timeline: int  #: the WAL timeline (a promotion or point-in-time recovery starts a new one)
    database: str
    database_oid: int  #: changes when a database of the same name is dropped and created
    slot: str

    def epoch(self, birth: int = 0) -> str:
        """The epoch id: stable for this identity; `birth` (an LSN, 0: none) gives a history
        that had to begin anew on the same identity an id of its own."""
        text = "\0".join(str(getattr(self, f.name)) for f in fields(self))
        if birth:
            text += f"\0{birth:X}"
        digest = hashlib.blake2b(text.encode(), digest_size=EPOCH_LENGTH // 2).hexdigest()
        return digest

    def differences(self, other: Identity) -> list[str]:
        """What differs from `other`, in words: ``database: "a" → "b"``."""
        return [
            f"{_LABELS[f.name]}: {getattr(other, f.name)!r} → {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def as_fields(self) -> dict[str, str]:
        """Plain strings, for storing next to a history (`from_fields` reads them back)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, stored: Mapping[str, str]) -> Identity | None:
        """The identity `as_fields` wrote, or None when `stored` is not one."""
        try:
            return cls(
                system=stored["system"],
                timeline=int(stored["timeline"]),
                database=stored["database"],
                database_oid=int(stored["database_oid"]),
                slot=stored["slot"],
            )
        except (KeyError, ValueError):
            return None


async def identify(dsn: str, slot: str) -> tuple[Identity, int]:
    """The identity of the database `dsn` names, for `slot`, and the server's WAL position
    (a history that reaches past it comes from a WAL that was rewound: a restored backup).

    Raises:
        ReplicationError: the server refused (`ServerError`) or could not be reached
            (`ConnectionLost`).
    """
    async with await ReplicationConnection.connect(dsn) as conn:
        rows = await conn.simple_query("IDENTIFY_SYSTEM")
        oids = await conn.simple_query(
            "SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()"
        )
    if not rows or len(rows[0]) < 4 or not oids:
        raise ReplicationError("IDENTIFY_SYSTEM gave no answer")
    system, timeline, wal_end, database = rows[0][:4]
    oid = oids[0][0]
    if system is None or timeline is None or wal_end is None or database is None or oid is None:
        raise ReplicationError("IDENTIFY_SYSTEM gave an incomplete answer")
    return Identity(system, int(timeline), database, int(oid), slot), parse_lsn(wal_end)
