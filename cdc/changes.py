"""Decoder messages → typed items: the rows of the WAL as JSON-ready Python values.

Sans-IO: `ChangeBuilder.feed(message)` takes one `cdc.messages` dataclass and returns the items
it produces; nothing here reads a socket or runs a query. The reader owns the I/O, including
fetching descriptions of user-defined types (`missing_types` → catalog → `register_types`).

Rules:

* Begin → `TransactionStart`; Commit → `TransactionEnd`. Every change and transactional logical
  message in between gets a 1-based `position`; a Truncate yields one `RowChange` per relation.
* Relation → one loader per column, picked once from a psycopg `Transformer` over the column
  type OIDs (bind once, load many); each tuple then goes through `cdc.rows` (in C where built)
  straight into a dict keyed by the precomputed column names. A Relation also yields a
  `TableColumns` item: the server sends one before a table's first row in a stream and again
  after its schema changes, so consumers that depend on column names learn of a RENAME or DROP
  before the next row, once per Relation rather than once per row.
* Type, Origin, non-transactional Message and UnknownMessage → nothing.
* TOAST: an UPDATE's unchanged cell takes the old tuple's value where the old tuple carries it;
  otherwise the column is left out of `new` and named in `unchanged`. A key-only old tuple ('K')
  becomes a dict of the key columns only.

Values must equal PostgreSQL's `to_jsonb(row)` (TimeZone=UTC) once rendered by `cdc.render`, so
loaders come from a private `AdaptersMap` in which every type whose psycopg default would not
round-trip keeps PostgreSQL's own spelling instead:

=====================================  ===================================================
int2, int4, int8                        `int`
bool                                    `bool`
text, varchar, bpchar, "char", name     `str`
numeric, float4, float8                 `RawJson` with the digits PostgreSQL printed (floats
                                        in exponent form rewritten the way jsonb's numeric
                                        prints them, -0 as 0); NaN and ±Infinity as `str`
json, jsonb                             `RawJson` (embedded as is)
date, timestamp, timestamptz            `str`, ISO 8601 as to_jsonb writes it ('T', "+00:00")
arrays                                  `list`, element by element with these loaders
composites                              `dict` {field: value}, fields with these loaders
domains                                 the base type's loader
everything else (oid, interval, bytea,  `str`: the type's text output
uuid, inet, time, timetz, ranges, …)
=====================================  ===================================================

The replication session must use DateStyle=ISO, TimeZone=UTC, IntervalStyle=postgres,
extra_float_digits=1 and bytea_output=hex: the loaders rely on that text.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import psycopg
from psycopg import abc
from psycopg.adapt import AdaptersMap, Buffer, Loader, RecursiveLoader
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite

from cdc import rows
from cdc.errors import ProtocolError
from cdc.messages import (
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    PgOutputMessage,
    Relation,
    Toast,
    Truncate,
    Update,
)
from cdc.render import RawJson

__all__ = [
    "FIRST_USER_OID",
    "ChangeBuilder",
    "Item",
    "LogicalMessage",
    "RowChange",
    "TableColumns",
    "TransactionEnd",
    "TransactionStart",
    "TypeDescription",
    "make_adapters",
]

FIRST_USER_OID = 16384
"""OIDs below this are built in (PostgreSQL's FirstNormalObjectId) and need no description."""

_TEXT = Format.TEXT
_UNCHANGED = Toast.UNCHANGED
#: `tuple.__new__(RowChange, values)`: a NamedTuple without its Python `__new__` (a third
#: of the cost of building one row's item); for the hot path only.
_new_tuple = tuple.__new__


# --- items ---------------------------------------------------------------------------------


class TransactionStart(NamedTuple):
    """Begin. A NamedTuple, like `RowChange`: one per transaction on the hot path."""

    xid: int
    commit_lsn: int  #: the commit record's LSN (Begin's final LSN): the transaction's cursor
    commit_time: datetime


class RowChange(NamedTuple):
    """One row change. A NamedTuple rather than a frozen dataclass: just as immutable, and
    made about 3x faster (one per row on the hot path; see docs/benchmarks.md)."""

    commit_lsn: int
    position: int  #: 1-based index of this change within its transaction
    schema: str
    table: str
    kind: str  #: "INSERT", "UPDATE", "DELETE" or "TRUNCATE"
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    unchanged: tuple[str, ...]  #: columns left out of `new`: unchanged TOAST with no old value


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    commit_lsn: int
    position: int
    prefix: str
    content: bytes


class TransactionEnd(NamedTuple):
    """Commit. A NamedTuple, like `RowChange`: one per transaction on the hot path."""

    commit_lsn: int
    end_lsn: int  #: where the next transaction may start: the flush position once handled
    commit_time: datetime


class TableColumns(NamedTuple):
    """A table's columns as of this point in the stream (from a Relation): they describe the
    table's rows after it. Not a change: it takes no position of its own, and sorts between
    change number `position` of its transaction and the next."""

    commit_lsn: int  #: the transaction it arrived in (0 outside one)
    position: int  #: how many changes of the transaction came before it
    schema: str
    table: str
    columns: tuple[str, ...]


Item = TransactionStart | RowChange | LogicalMessage | TransactionEnd | TableColumns


@dataclass(frozen=True, slots=True)
class TypeDescription:
    """One `pg_type` row, as far as loading its text needs (filled by `cdc.catalog`)."""

    oid: int
    namespace: str
    name: str
    typtype: str  #: 'b' base, 'c' composite, 'd' domain, 'e' enum, 'p' pseudo, 'r', 'm' ranges
    base_oid: int = 0  #: a domain's typbasetype
    element_oid: int = 0  #: typelem when this is an array type
    array_oid: int = 0  #: typarray
    fields: tuple[tuple[str, int], ...] = ()  #: a composite's (attribute name, type OID)

    def dependencies(self) -> tuple[int, ...]:
        """The type OIDs this type's loader needs."""
        return (self.base_oid, self.element_oid, *(oid for _, oid in self.fields))


# --- loaders -------------------------------------------------------------------------------

_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


class _NumericLoader(Loader):
    """numeric: the digits as printed (`1.50` stays `1.50`); NaN/±Infinity as strings."""

    def load(self, data: Buffer) -> str:
        text = RawJson(data, "ascii")
        if text in _NON_FINITE:
            return str(text)
        return text


class _FloatLoader(Loader):
    """float4/float8 as jsonb stores them: via numeric, so no exponent and no negative zero.

    With extra_float_digits=1 PostgreSQL prints the shortest exact digits, switching to an
    exponent for large and small magnitudes (`1e+100`, `1.5e-07`); to_jsonb reads that text
    back as numeric, which prints it positionally, as `Decimal`'s "f" format does.
    """

    def load(self, data: Buffer) -> str:
        text = str(data, "ascii")
        if "e" in text:
            return RawJson(format(Decimal(text), "f"))
        if text in _NON_FINITE:
            return text
        if text == "-0":
            return RawJson("0")
        return RawJson(text)


class _JsonLoader(Loader):
    """json/jsonb: the document's text, embedded verbatim."""

    def load(self, data: Buffer) -> RawJson:
        return RawJson(data, "utf-8")


class _TimestampLoader(Loader):
    """timestamp: ISO text with 'T' ("2026-01-01T10:00:00.5", "infinity", "... BC" kept)."""

    def load(self, data: Buffer) -> str:
        return str(data, "utf-8").replace(" ", "T", 1)


class _TimestamptzLoader(Loader):
    """timestamptz: as timestamp, with the offset written "+HH:MM" ("+00" → "+00:00")."""

    def load(self, data: Buffer) -> str:
        text = str(data, "utf-8").replace(" ", "T", 1)
        if text.endswith("+00"):
            return text + ":00"
        return _xsd_offset(text)


def _xsd_offset(text: str) -> str:
    """Rewrite an ISO offset ("+05", "-03:30", before an optional " BC") as XSD's "+05:00"."""
    cut = text.find("T")
    if cut < 0:  # infinity, -infinity
        return text
    core, suffix = (text[:-3], text[-3:]) if text.endswith(" BC") else (text, "")
    sign = max(core.rfind("+"), core.rfind("-"))
    if sign > cut and ":" not in core[sign:]:
        core += ":00"
    return core + suffix


class _DomainLoader(RecursiveLoader):
    """A domain: whatever its base type's loader gives (subclassed with `base_oid` set).

    Resolved when instantiated, so a base type registered after the domain still applies.
    """

    base_oid = 0

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = self._tx.get_loader(self.base_oid, _TEXT).load

    def load(self, data: Buffer) -> Any:
        return self._load(data)


def _composite_object(values: Sequence[Any], info: CompositeInfo) -> dict[str, Any]:
    """A composite as to_jsonb writes it: an object keyed by attribute name."""
    names = info.field_names
    if len(values) == len(names):
        return dict(zip(names, values, strict=True))
    # "()" is both a zero-attribute record and a one-attribute record holding NULL.
    return {name: value for name, value in itertools.zip_longest(names, values) if name}


def _no_factory(*values: Any) -> dict[str, Any]:  # pragma: no cover - make_object is used
    raise AssertionError("composite values are built by _composite_object")


_KEEP_DEFAULT = frozenset({"bool", "int2", "int4", "int8", "text", "varchar", "bpchar", "char"})

_SPECIAL: dict[str, type[abc.Loader]] = {
    "numeric": _NumericLoader,
    "float4": _FloatLoader,
    "float8": _FloatLoader,
    "json": _JsonLoader,
    "jsonb": _JsonLoader,
    "timestamp": _TimestampLoader,
    "timestamptz": _TimestamptzLoader,
}


def make_adapters() -> AdaptersMap:
    """A private copy of psycopg's adapters whose text loaders produce to_jsonb's values.

    psycopg's array loaders resolve their element loader in this map, so arrays of every
    built-in type follow the same rules without being registered here.
    """
    adapters = AdaptersMap(psycopg.postgres.adapters)
    text_loader = adapters.get_loader(adapters.types["text"].oid, _TEXT)
    assert text_loader is not None
    array_oids = {info.array_oid for info in adapters.types}
    for info in adapters.types:
        if info.oid in array_oids or info.name in _KEEP_DEFAULT:
            continue
        adapters.register_loader(info.oid, _SPECIAL.get(info.name, text_loader))
    return adapters


def _codes_by_class(adapters: AdaptersMap) -> dict[type, int]:
    """The loader classes whose values `cdc.rows` can make without calling them."""
    by_class: dict[type, int] = {
        _NumericLoader: rows.NUMERIC,
        _JsonLoader: rows.JSON,
        _TimestampLoader: rows.TIMESTAMP,
        _TimestamptzLoader: rows.TIMESTAMPTZ,
    }
    for name, code in (
        ("text", rows.TEXT),
        ("int2", rows.INT),
        ("int4", rows.INT),
        ("int8", rows.INT),
        ("bool", rows.BOOL),
    ):
        loader = adapters.get_loader(adapters.types[name].oid, _TEXT)
        assert loader is not None
        by_class.setdefault(loader, code)
    return by_class


# --- the builder ---------------------------------------------------------------------------


class ChangeBuilder:
    """Turns decoder messages into items; holds the per-relation loaders and type catalog.

    Feed every message in stream order. Before feeding a Relation, ask `missing_types` and
    `register_types` what it names (repeat until it returns nothing: an array's element, a
    domain's base or a composite's fields are only known once their owner is described).
    A type never described still loads, as its text.
    """

    def __init__(self) -> None:
        self._adapters = make_adapters()
        self._codes_by_class = _codes_by_class(self._adapters)
        self._types: dict[int, TypeDescription] = {}
        self._array_elements: dict[int, int] = {}  # array OID → element OID, from typarray
        self._bound: dict[int, rows.Bound] = {}
        #: Relation OID → (relation, names, codes, loaders, schema, table, key indexes): what
        #: `cdc.runs` needs to type that relation's row changes itself, for each bound one.
        self.run_plans: dict[int, tuple[Any, ...]] = {}
        #: The transaction being fed (its commit LSN; None between transactions), and how
        #: many of its changes have had a position (`cdc.runs` moves it on for its own).
        self.commit_lsn: int | None = None
        self.position = 0
        self._handlers: dict[type, Callable[[Any], list[Item]]] = {
            Begin: self._on_begin,
            Commit: self._on_commit,
            Relation: self._on_relation,
            Insert: self._on_insert,
            Update: self._on_update,
            Delete: self._on_delete,
            Truncate: self._on_truncate,
            Message: self._on_message,
        }

    # -- types --

    def missing_types(self, relation: Relation) -> list[int]:
        """User type OIDs this relation's columns need that have no description yet."""
        missing: list[int] = []
        seen: set[int] = set()
        pending = [column.type_oid for column in relation.columns]
        while pending:
            oid = pending.pop()
            if oid < FIRST_USER_OID or oid in seen:
                continue
            seen.add(oid)
            description = self._types.get(oid)
            if description is not None:
                pending.extend(description.dependencies())
            elif oid in self._array_elements:
                pending.append(self._array_elements[oid])
            else:
                missing.append(oid)
        return sorted(missing)

    def register_types(self, descriptions: Iterable[TypeDescription]) -> None:
        """Install loaders for user-defined types (idempotent per OID)."""
        new = [d for d in descriptions if self._types.get(d.oid) != d]
        for description in new:
            self._types[description.oid] = description
            if description.array_oid:
                self._array_elements[description.array_oid] = description.oid
        for description in new:
            self._install(description)
        if new:
            self._bound.clear()  # rebind lazily: loaders are picked when a relation is bound
            self.run_plans.clear()

    def _install(self, d: TypeDescription) -> None:
        adapters = self._adapters
        if d.typtype == "c":
            info = CompositeInfo(
                d.name,
                d.oid,
                d.array_oid,
                field_names=[name for name, _ in d.fields],
                field_types=[oid for _, oid in d.fields],
            )
            register_composite(info, adapters, _no_factory, make_object=_composite_object)
            return
        loader: type[abc.Loader]
        if d.typtype == "d" and d.base_oid:
            loader = type(f"Domain{d.oid}Loader", (_DomainLoader,), {"base_oid": d.base_oid})
        elif d.element_oid:
            # An array type: psycopg's array loader, resolving the element loader in this map
            # (registered with the element's own description when that one is known).
            if d.element_oid not in self._types:
                TypeInfo(d.name, d.element_oid, d.oid).register(adapters)
            return
        else:  # enum, range, multirange, pseudo, other base types: their text
            text_loader = adapters.get_loader(adapters.types["text"].oid, _TEXT)
            assert text_loader is not None
            loader = text_loader
        adapters.register_loader(d.oid, loader)
        if d.array_oid:
            TypeInfo(d.name, d.oid, d.array_oid).register(adapters)

    def _resolve_domain(self, oid: int) -> int:
        for _ in range(64):  # domains over domains, bounded against a bogus catalog
            description = self._types.get(oid)
            if description is None or description.typtype != "d" or not description.base_oid:
                break
            oid = description.base_oid
        return oid

    def _bind(self, relation: Relation) -> rows.Bound:
        oids = [self._resolve_domain(column.type_oid) for column in relation.columns]
        bound = self._bound[relation.oid] = rows.Bound(
            relation, oids, self._adapters, self._codes_by_class
        )
        self.run_plans[relation.oid] = (
            relation,
            bound.names,
            bound.codes,
            bound.loads,
            bound.schema,
            bound.table,
            bound.key_indexes,
        )
        return bound

    def _bound_for(self, relation: Relation) -> rows.Bound:
        bound = self._bound.get(relation.oid)
        if bound is None or (bound.relation is not relation and bound.relation != relation):
            bound = self._bind(relation)
        return bound

    # -- messages --

    def feed(self, message: PgOutputMessage) -> list[Item]:
        """The items one decoder message produces (often none).

        Raises:
            ProtocolError: a change outside a transaction, a tuple whose width does not match
                its relation, or a value its type's loader cannot read.
        """
        handler = self._handlers.get(type(message))
        return handler(message) if handler is not None else []

    def _next_position(self, what: str) -> tuple[int, int]:
        commit_lsn = self.commit_lsn
        if commit_lsn is None:
            raise ProtocolError(f"{what} outside a transaction")
        self.position += 1
        return commit_lsn, self.position

    def _on_begin(self, message: Begin) -> list[Item]:
        self.commit_lsn = message.final_lsn
        self.position = 0
        return [TransactionStart(message.xid, message.final_lsn, message.commit_time)]

    def _on_commit(self, message: Commit) -> list[Item]:
        self.commit_lsn = None
        self.position = 0
        return [TransactionEnd(message.commit_lsn, message.end_lsn, message.commit_time)]

    def _on_relation(self, message: Relation) -> list[Item]:
        bound = self._bind(message)
        commit_lsn = self.commit_lsn or 0
        return [TableColumns(commit_lsn, self.position, bound.schema, bound.table, bound.names)]

    def _on_insert(self, message: Insert) -> list[Item]:
        # The hot path: `_bound_for` and `_next_position` inlined (0.15 µs of 2.8 per row).
        relation = message.relation
        bound = self._bound.get(relation.oid)
        if bound is None or bound.relation is not relation:
            bound = self._bound_for(relation)
        cells = message.new
        if len(cells) != bound.width:
            bound.check_width(cells)
        try:
            new = bound.load_row(cells)
        except rows.LOAD_ERRORS as ex:
            raise bound.unloadable(ex) from ex
        commit_lsn = self.commit_lsn
        if commit_lsn is None:
            raise ProtocolError("Insert outside a transaction")
        self.position = position = self.position + 1
        return [
            _new_tuple(
                RowChange,
                (commit_lsn, position, bound.schema, bound.table, "INSERT", new, None, ()),
            )
        ]

    def _on_update(self, message: Update) -> list[Item]:
        bound = self._bound_for(message.relation)
        if _UNCHANGED not in message.new:  # every new value sent: nothing to merge
            new = bound.row_of(message.new)
            old = None
            if message.old is not None:
                old = bound.old_of(message.old, message.old_is_key)
            commit_lsn, position = self._next_position("Update")
            return [
                _new_tuple(
                    RowChange,
                    (commit_lsn, position, bound.schema, bound.table, "UPDATE", new, old, ()),
                )
            ]
        old_values: Sequence[Any] | None = None
        old = None
        if message.old is not None:
            old_values = bound.values(message.old)
            old = bound.key(old_values) if message.old_is_key else bound.row(old_values)
        values = bound.values(message.new)
        unchanged: tuple[str, ...] = ()
        if _UNCHANGED in values:
            new, unchanged = self._merge_toast(bound, values, old_values, message.old_is_key)
        else:
            new = dict(zip(bound.names, values, strict=True))
        commit_lsn, position = self._next_position("Update")
        return [
            RowChange(
                commit_lsn, position, bound.schema, bound.table, "UPDATE", new, old, unchanged
            )
        ]

    @staticmethod
    def _merge_toast(
        bound: rows.Bound,
        values: Sequence[Any],
        old_values: Sequence[Any] | None,
        old_is_key: bool,
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Fill unchanged TOAST cells from the old tuple where it carries them."""
        new: dict[str, Any] = {}
        unchanged: list[str] = []
        keys = bound.key_indexes
        for i, (name, value) in enumerate(zip(bound.names, values, strict=True)):
            if value is _UNCHANGED:
                if (
                    old_values is None
                    or (old_is_key and i not in keys)
                    or old_values[i] is _UNCHANGED
                ):
                    unchanged.append(name)
                    continue
                value = old_values[i]
            new[name] = value
        return new, tuple(unchanged)

    def _on_delete(self, message: Delete) -> list[Item]:
        bound = self._bound_for(message.relation)
        old = bound.old_of(message.old, message.old_is_key)
        commit_lsn, position = self._next_position("Delete")
        return [RowChange(commit_lsn, position, bound.schema, bound.table, "DELETE", None, old, ())]

    def _on_truncate(self, message: Truncate) -> list[Item]:
        items: list[Item] = []
        for relation in message.relations:
            commit_lsn, position = self._next_position("Truncate")
            items.append(
                RowChange(
                    commit_lsn,
                    position,
                    relation.namespace,
                    relation.name,
                    "TRUNCATE",
                    None,
                    None,
                    (),
                )
            )
        return items

    def _on_message(self, message: Message) -> list[Item]:
        if not message.transactional:
            return []
        commit_lsn, position = self._next_position("Message")
        return [LogicalMessage(commit_lsn, position, message.prefix, message.content)]
