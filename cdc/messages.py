"""pgoutput messages, one class per message kind: frozen dataclasses, except the frequent ones.

`Insert`, `Update` and `Delete` come once per row change, `Begin` and `Commit` once per
transaction, so they are NamedTuples: just as immutable, made in a third of the time of a
frozen dataclass (docs/benchmarks.md §1).

The decoder (`cdc.decoder`) turns the bytes of one XLogData payload into exactly one of these.
Field names follow "Logical Replication Message Formats" in the PostgreSQL manual (protocol
version 1, plus the logical decoding `Message` kind enabled by `messages 'true'`).

Tuple cells are `bytes` (the column's text representation), `None` (SQL NULL) or
`Toast.UNCHANGED` (an unchanged TOASTed value the server did not send).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

__all__ = [
    "Begin",
    "Cell",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "MessageKind",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "Toast",
    "Truncate",
    "Type",
    "UnknownMessage",
    "Update",
]


class MessageKind(enum.IntEnum):
    """The first byte of a pgoutput message ("Logical Replication Message Formats")."""

    BEGIN = ord("B")  #: Begin: final LSN, commit timestamp, xid
    COMMIT = ord("C")  #: Commit: flags, commit LSN, end LSN, commit timestamp
    ORIGIN = ord("O")  #: Origin: origin commit LSN, origin name
    RELATION = ord("R")  #: Relation: OID, namespace, name, replica identity, columns
    TYPE = ord("Y")  #: Type: OID, namespace, name (for non built-in types)
    INSERT = ord("I")  #: Insert: relation OID, 'N' + new tuple
    UPDATE = ord("U")  #: Update: relation OID, optional 'K'/'O' + old tuple, 'N' + new tuple
    DELETE = ord("D")  #: Delete: relation OID, 'K'/'O' + old tuple
    TRUNCATE = ord("T")  #: Truncate: relation count, option bits, relation OIDs
    MESSAGE = ord("M")  #: Message: flags, LSN, prefix, content (pg_logical_emit_message)


class Toast(enum.Enum):
    """Marker for a tuple cell whose value was not sent ('u': unchanged TOASTed value)."""

    UNCHANGED = "u"


Cell = bytes | None | Toast
"""One column of a tuple: text bytes, None for NULL, or Toast.UNCHANGED."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's description; sent before its first row and again after any schema change."""

    oid: int
    namespace: str
    name: str
    replica_identity: str  #: 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


class Begin(NamedTuple):
    final_lsn: int  #: LSN of the commit record: the transaction's place in commit order
    commit_time: datetime  #: UTC, aware
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    relation: Relation
    new: tuple[Cell, ...]


class Update(NamedTuple):
    relation: Relation
    new: tuple[Cell, ...]
    old: tuple[Cell, ...] | None  #: present with REPLICA IDENTITY FULL ('O') or a key change ('K')
    old_is_key: bool  #: True when `old` holds only the replica identity key columns ('K')


class Delete(NamedTuple):
    relation: Relation
    old: tuple[Cell, ...]
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[Relation, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message written by `pg_logical_emit_message`."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message kind this decoder does not know; the caller logs and skips it."""

    kind: int
    data: bytes


PgOutputMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | UnknownMessage
)
