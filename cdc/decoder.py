"""Sans-IO pgoutput decoder: the bytes of one XLogData payload in, one message dataclass out.

Why it exists: pgoutput (protocol version 1) is the binary format PostgreSQL's built-in logical
decoding plugin streams; everything walcast delivers starts as one of its messages. Keeping the
decoder free of I/O (no asyncio, no psycopg) lets it be tested with hand-built bytes, fuzzed,
and benchmarked on its own.

Rules:

* One call to `Decoder.decode` decodes one payload into exactly one message from
  `cdc.messages` (see "Logical Replication Message Formats" in the PostgreSQL manual).
* The decoder keeps one piece of state: the relation cache. A `Relation` message replaces the
  cached description of its OID (the server re-sends it after a schema change) and is also
  returned. Row messages (Insert, Update, Delete, Truncate) carry the cached `Relation`; an OID
  never described raises `UnknownRelationError`.
* A message kind this decoder does not know becomes `UnknownMessage` so the caller can log it
  and carry on. Anything else that is not exactly a well-formed message (too short, trailing
  bytes, a string without its NUL, invalid UTF-8, an unknown tuple cell kind, a negative
  length, a tuple whose column count differs from its relation's) raises `ProtocolError`
  carrying the LSN passed in. No other exception escapes `decode`.

Reading works on the payload's `bytes` with precompiled `struct.Struct` objects (`unpack_from`
at an offset, no intermediate copies). The tuple loop, run once per column of every row, is
also in C (`cdc._speedups.read_cells`, built when a compiler is there); `read_cells_py` is the
same loop in Python, used otherwise, and the tests run both and fuzz them against each other.
An Insert, one per inserted row, is read whole in one call the same way (`read_insert` /
`read_insert_py`); only what that call leaves (anything not a well-formed Insert) takes the
general path below, which decodes it or says exactly what is wrong.
A memoryview payload is copied into `bytes` once: slicing `bytes` makes each tuple cell in one
step, where slicing a memoryview makes a view and then the copy (measured in
`bench.cdc_stages`). Short input surfaces inside the readers as
`struct.error` or `IndexError` and is translated into `ProtocolError` once, in `decode`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cdc.errors import ProtocolError, UnknownRelationError
from cdc.messages import (
    Begin,
    Cell,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    MessageKind,
    Origin,
    PgOutputMessage,
    Relation,
    Toast,
    Truncate,
    Type,
    UnknownMessage,
    Update,
)

__all__ = ["Decoder"]

#: PostgreSQL timestamps count microseconds from this instant.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_COLUMN_TYPE = struct.Struct("!Ii")  # type OID, type modifier
_TRUNCATE_HEAD = struct.Struct("!IB")  # relation count, option bits
_MESSAGE_HEAD = struct.Struct("!BQ")  # flags, LSN
_ROW_HEAD = struct.Struct("!IB")  # relation OID, first tuple marker (Insert, Update, Delete)
_INSERT_HEAD = struct.Struct("!IBH")  # relation OID, 'N', column count

_NUL = re.compile(b"\x00")

# Tuple cell kinds (TupleData in "Logical Replication Message Formats").
_CELL_NULL = ord("n")
_CELL_UNCHANGED = ord("u")
_CELL_TEXT = ord("t")
_CELL_BINARY = ord("b")
# Tuple markers in Update and Delete messages.
_TUPLE_NEW = ord("N")
_TUPLE_KEY = ord("K")
_TUPLE_OLD = ord("O")

_COLUMN_FLAG_KEY = 1
_MESSAGE_FLAG_TRANSACTIONAL = 1
_TRUNCATE_CASCADE = 1
_TRUNCATE_RESTART_IDENTITY = 2

_UNCHANGED = Toast.UNCHANGED
_INSERT = ord("I")


class _Reader:
    """A cursor over one message: reads fields in order and fails with the message's LSN."""

    __slots__ = ("buf", "lsn", "pos")

    def __init__(self, buf: bytes, lsn: int | None) -> None:
        self.buf = buf
        self.pos = 1  # past the message kind byte
        self.lsn = lsn

    def fail(self, message: str) -> ProtocolError:
        return ProtocolError(message, lsn=self.lsn)

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def u8(self) -> int:
        value: int = self.buf[self.pos]
        self.pos += 1
        return value

    def u32(self) -> int:
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> str:
        """A NUL-terminated UTF-8 string."""
        found = _NUL.search(self.buf, self.pos)
        if found is None:
            raise self.fail("string without its terminating NUL")
        end = found.start()
        try:
            text = str(self.buf[self.pos : end], "utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not valid UTF-8") from None
        self.pos = end + 1
        return text

    def namespace(self) -> str:
        """A namespace name; pgoutput sends an empty string for pg_catalog."""
        return self.string() or "pg_catalog"

    def timestamp(self, micros: int) -> datetime:
        try:
            return _PG_EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise self.fail(f"timestamp out of range: {micros}") from None

    def tuple(self, relation: Relation) -> tuple[Cell, ...]:
        """TupleData: Int16 column count, then one cell per column. The hot path."""
        (ncols,) = _U16.unpack_from(self.buf, self.pos)
        if ncols != len(relation.columns):
            raise self.fail(
                f"tuple has {ncols} columns, relation {relation.namespace}.{relation.name} "
                f"has {len(relation.columns)}"
            )
        try:
            cells, self.pos = _read_cells(self.buf, self.pos + 2, ncols, _UNCHANGED)
        except ValueError as exc:
            raise self.fail(str(exc)) from None
        return cells


def read_cells_py(
    buf: bytes, pos: int, ncols: int, unchanged: Toast
) -> tuple[tuple[Cell, ...], int]:
    """`ncols` TupleData cells from `pos` on, and the position after them.

    Text and binary cells become `bytes`, null ones None, unchanged TOAST ones `unchanged`.
    A cell's length is read unsigned, so a negative one becomes a length past any real
    payload; since the position only grows, one bounds check after the loop catches both.
    Raises `ValueError` for a bad cell, and `IndexError` or `struct.error` for a message that
    ends too soon. `cdc._speedups.read_cells` is the same function in C.
    """
    unpack_length = _U32.unpack_from
    cells: list[Cell] = [None] * ncols
    for i in range(ncols):
        kind = buf[pos]
        if kind == _CELL_TEXT or kind == _CELL_BINARY:
            start = pos + 5
            pos = start + unpack_length(buf, pos + 1)[0]
            cells[i] = buf[start:pos]
        elif kind == _CELL_NULL:
            pos += 1
        elif kind == _CELL_UNCHANGED:
            cells[i] = unchanged
            pos += 1
        else:
            raise ValueError(f"invalid tuple cell kind {kind:#04x}")
    if pos > len(buf):
        raise ValueError("tuple cell length is negative or past the end")
    return tuple(cells), pos


def read_insert_py(
    buf: bytes, relations: dict[int, Relation], insert: type[Insert], unchanged: Toast
) -> Insert | None:
    """A whole well-formed Insert message, or None for anything else (which the general path
    then decodes or reports). `cdc._speedups.read_insert` is the same function in C."""
    if len(buf) < 8 or buf[0] != _INSERT or buf[5] != _TUPLE_NEW:
        return None
    oid, _, ncols = _INSERT_HEAD.unpack_from(buf, 1)
    relation = relations.get(oid)
    if relation is None or ncols != len(relation.columns):
        return None
    try:
        cells, end = read_cells_py(buf, 8, ncols, unchanged)
    except (ValueError, IndexError, struct.error):
        return None
    return insert(relation, cells) if end == len(buf) else None


_read_cells: Callable[[bytes, int, int, Toast], tuple[tuple[Cell, ...], int]]
_read_insert: Callable[[bytes, dict[int, Relation], type[Insert], Toast], Insert | None]
try:
    from cdc._speedups import read_cells as _read_cells
    from cdc._speedups import read_insert as _read_insert
except ImportError:  # built without a C compiler: the same loops in Python
    _read_cells, _read_insert = read_cells_py, read_insert_py


class Decoder:
    """Decodes pgoutput messages one payload at a time, remembering relations by OID.

    Attributes:
        relations: the relation cache, filled by Relation messages; may be pre-seeded.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, payload: bytes | memoryview, lsn: int | None = None) -> PgOutputMessage:
        """Decode one XLogData payload.

        Args:
            payload: the message bytes, kind byte first.
            lsn: the WAL position of the message (XLogData's data_start), used in errors.

        Raises:
            UnknownRelationError: a row message names a relation never described.
            ProtocolError: the payload is not a well-formed message.
        """
        buf = payload if type(payload) is bytes else bytes(payload)
        if not buf:
            raise ProtocolError("empty pgoutput message", lsn=lsn)
        kind = buf[0]
        if kind == _INSERT:  # the common case, in one call
            insert = _read_insert(buf, self.relations, Insert, _UNCHANGED)
            if insert is not None:
                return insert
        parser = _PARSERS.get(kind)
        if parser is None:
            return UnknownMessage(kind, buf)
        reader = _Reader(buf, lsn)
        try:
            message = parser(self, reader)
        except (struct.error, IndexError):
            raise ProtocolError(f"truncated {chr(kind)!r} message", lsn=lsn) from None
        if reader.pos != len(buf):
            raise ProtocolError(
                f"{len(buf) - reader.pos} unexpected bytes after {chr(kind)!r} message", lsn=lsn
            )
        return message

    def _relation(self, oid: int, lsn: int | None) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise UnknownRelationError(
                f"row message for relation OID {oid}, never described by a Relation message",
                lsn=lsn,
            ) from None


def _parse_begin(decoder: Decoder, r: _Reader) -> Begin:
    final_lsn, micros, xid = r.unpack(_BEGIN)
    return Begin(final_lsn, r.timestamp(micros), xid)


def _parse_commit(decoder: Decoder, r: _Reader) -> Commit:
    flags, commit_lsn, end_lsn, micros = r.unpack(_COMMIT)
    return Commit(flags, commit_lsn, end_lsn, r.timestamp(micros))


def _parse_origin(decoder: Decoder, r: _Reader) -> Origin:
    (commit_lsn,) = r.unpack(_U64)
    return Origin(commit_lsn=commit_lsn, name=r.string())


def _parse_relation(decoder: Decoder, r: _Reader) -> Relation:
    oid = r.u32()
    namespace = r.namespace()
    name = r.string()
    replica_identity = chr(r.u8())
    (ncols,) = r.unpack(_U16)
    columns = []
    for _ in range(ncols):
        flags = r.u8()
        column_name = r.string()
        type_oid, type_modifier = r.unpack(_COLUMN_TYPE)
        columns.append(
            Column(
                name=column_name,
                type_oid=type_oid,
                type_modifier=type_modifier,
                is_key=bool(flags & _COLUMN_FLAG_KEY),
            )
        )
    relation = Relation(
        oid=oid,
        namespace=namespace,
        name=name,
        replica_identity=replica_identity,
        columns=tuple(columns),
    )
    decoder.relations[oid] = relation
    return relation


def _parse_type(decoder: Decoder, r: _Reader) -> Type:
    oid = r.u32()
    namespace = r.namespace()
    return Type(oid=oid, namespace=namespace, name=r.string())


def _parse_insert(decoder: Decoder, r: _Reader) -> Insert:
    oid, marker = r.unpack(_ROW_HEAD)
    relation = decoder._relation(oid, r.lsn)
    if marker != _TUPLE_NEW:
        raise r.fail("Insert without its 'N' tuple")
    return Insert(relation=relation, new=r.tuple(relation))


def _parse_update(decoder: Decoder, r: _Reader) -> Update:
    oid, marker = r.unpack(_ROW_HEAD)
    relation = decoder._relation(oid, r.lsn)
    old = None
    old_is_key = False
    if marker == _TUPLE_KEY or marker == _TUPLE_OLD:
        old_is_key = marker == _TUPLE_KEY
        old = r.tuple(relation)
        marker = r.u8()
    if marker != _TUPLE_NEW:
        raise r.fail(f"Update with tuple marker {marker:#04x} where 'N' was expected")
    return Update(relation=relation, new=r.tuple(relation), old=old, old_is_key=old_is_key)


def _parse_delete(decoder: Decoder, r: _Reader) -> Delete:
    oid, marker = r.unpack(_ROW_HEAD)
    relation = decoder._relation(oid, r.lsn)
    if marker != _TUPLE_KEY and marker != _TUPLE_OLD:
        raise r.fail(f"Delete with tuple marker {marker:#04x} where 'K' or 'O' was expected")
    return Delete(relation=relation, old=r.tuple(relation), old_is_key=marker == _TUPLE_KEY)


def _parse_truncate(decoder: Decoder, r: _Reader) -> Truncate:
    nrels, options = r.unpack(_TRUNCATE_HEAD)
    if len(r.buf) - r.pos != 4 * nrels:
        raise r.fail(f"Truncate of {nrels} relations has {len(r.buf) - r.pos} bytes of OIDs")
    relations = tuple(decoder._relation(r.u32(), r.lsn) for _ in range(nrels))
    return Truncate(
        relations=relations,
        cascade=bool(options & _TRUNCATE_CASCADE),
        restart_identity=bool(options & _TRUNCATE_RESTART_IDENTITY),
    )


def _parse_message(decoder: Decoder, r: _Reader) -> Message:
    flags, lsn = r.unpack(_MESSAGE_HEAD)
    prefix = r.string()
    (length,) = r.unpack(_I32)
    if length < 0 or r.pos + length > len(r.buf):
        raise r.fail(f"Message content length {length} is negative or past the end")
    content = r.buf[r.pos : r.pos + length]
    r.pos += length
    return Message(
        transactional=bool(flags & _MESSAGE_FLAG_TRANSACTIONAL),
        lsn=lsn,
        prefix=prefix,
        content=content,
    )


_PARSERS: dict[int, Callable[[Decoder, _Reader], PgOutputMessage]] = {
    MessageKind.BEGIN: _parse_begin,
    MessageKind.COMMIT: _parse_commit,
    MessageKind.ORIGIN: _parse_origin,
    MessageKind.RELATION: _parse_relation,
    MessageKind.TYPE: _parse_type,
    MessageKind.INSERT: _parse_insert,
    MessageKind.UPDATE: _parse_update,
    MessageKind.DELETE: _parse_delete,
    MessageKind.TRUNCATE: _parse_truncate,
    MessageKind.MESSAGE: _parse_message,
}
