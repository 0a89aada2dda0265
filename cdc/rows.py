"""Tuple cells → typed values with one loader per column: the per-row loop of `cdc.changes`.

Why it exists: turning a row's text cells into values is most of the CDC path's CPU, so it runs
in C (`cdc._speedups.load_row` / `load_values`) when the extension was built, and as
`load_row_py` / `load_values_py` otherwise. `Bound` is one relation's plan for it: the column
names, and one loader per column picked once from `cdc.changes`' adapters.

The loaders (psycopg's, and those of `cdc.changes`) define every value; the C loop only skips
the Python call for the common text forms, and a column's code says which form its loader
produces:

=================  =========================================================================
code               the loader's value, which C makes itself when the text is ordinary
=================  =========================================================================
`TEXT`             the UTF-8 text (psycopg's text loader without a connection)
`INT`              `int`, for an optional '-' and up to 18 digits (psycopg's int loader)
`BOOL`             True for "t", False for "f" (psycopg's bool loader)
`NUMERIC`          `RawJson` of the ASCII digits when they start with a digit or "-digit"
`JSON`             `RawJson` of the UTF-8 text
`TIMESTAMP`        ASCII text with its first space made a 'T'
`TIMESTAMPTZ`      the same, ending in "+00" and given ":00"
`CALL`             (anything else) the loader is called
=================  =========================================================================

For any other text (non-ASCII time, a non-canonical integer, invalid UTF-8, ...) C calls the
loader too, so both twins always give the loader's value or its exception; tests/test_changes.py
runs its cases and the type matrix through both and fuzzes them against each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import psycopg
from psycopg import abc
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq import Format

from cdc.errors import ProtocolError
from cdc.messages import Relation, Toast
from cdc.render import RawJson

__all__ = [
    "BOOL",
    "CALL",
    "INT",
    "JSON",
    "LOAD_ERRORS",
    "NUMERIC",
    "TEXT",
    "TIMESTAMP",
    "TIMESTAMPTZ",
    "Bound",
    "Load",
    "codes_for",
    "load_row",
    "load_row_py",
    "load_values",
    "load_values_py",
]

# Must match the enum in cdc/_speedups.c.
CALL, TEXT, INT, BOOL, NUMERIC, JSON, TIMESTAMP, TIMESTAMPTZ = range(8)

Load = Callable[[Any], Any]
"""One column's loader: `Loader.load`, bound."""


def codes_for(loaders: Sequence[abc.Loader], by_class: dict[type, int]) -> bytes:
    """One code per column: `by_class[type(loader)]`, or `CALL` for a loader not listed."""
    return bytes(by_class.get(type(loader), CALL) for loader in loaders)


def load_values_py(
    codes: bytes, loaders: Sequence[Load], raw_json: type, unchanged: Any, cells: Sequence[Any]
) -> tuple[Any, ...]:
    """Each cell's value: None for None, `unchanged` kept, `loaders[i](cell)` otherwise.

    `codes` and `raw_json` are what C needs to skip the call; the loaders alone define the
    values. The cells come last so that a `functools.partial` can hold the rest. Raises
    ValueError for a width that differs from the loaders', and whatever a loader raises.
    """
    if len(cells) != len(loaders):
        raise ValueError(f"{len(cells)} cells for {len(loaders)} columns")
    return tuple(
        cell if cell is None or cell is unchanged else load(cell)
        for cell, load in zip(cells, loaders, strict=True)
    )


def load_row_py(
    names: Sequence[str],
    codes: bytes,
    loaders: Sequence[Load],
    raw_json: type,
    unchanged: Any,
    cells: Sequence[Any],
) -> dict[str, Any]:
    """`load_values_py` as a dict by column name, leaving out `unchanged` cells."""
    if len(cells) != len(loaders):
        raise ValueError(f"{len(cells)} cells for {len(loaders)} columns")
    return {
        name: cell if cell is None else load(cell)
        for name, cell, load in zip(names, cells, loaders, strict=True)
        if cell is not unchanged
    }


load_row: Callable[..., dict[str, Any]]
load_values: Callable[..., tuple[Any, ...]]
try:
    from cdc._speedups import load_row, load_values
except ImportError:  # built without a C compiler: the same loops in Python
    load_row, load_values = load_row_py, load_values_py


LOAD_ERRORS = (psycopg.Error, ValueError, ArithmeticError)
"""What a loader raises for text it cannot read (reported as a `ProtocolError`)."""

_TEXT = Format.TEXT
_UNCHANGED = Toast.UNCHANGED


class Bound:
    """A Relation with its loaders bound: names, and one loader per column with its code."""

    __slots__ = (
        "codes",
        "key_indexes",
        "load_row",
        "load_values",
        "loads",
        "names",
        "relation",
        "schema",
        "table",
        "width",
    )

    def __init__(
        self,
        relation: Relation,
        oids: Sequence[int],
        adapters: AdaptersMap,
        codes_by_class: dict[type, int],
    ) -> None:
        self.relation = relation
        self.schema = relation.namespace
        self.table = relation.name
        self.names = tuple(column.name for column in relation.columns)
        self.width = len(self.names)
        self.key_indexes = tuple(i for i, c in enumerate(relation.columns) if c.is_key)
        transformer = Transformer(adapters)
        loaders = [transformer.get_loader(oid, _TEXT) for oid in oids]
        #: one code per column (`codes_for`), and one bound `load` per column
        self.codes = codes = codes_for(loaders, codes_by_class)
        self.loads = loads = tuple(loader.load for loader in loaders)
        #: cells → {name: value}, unchanged TOAST cells left out (in C where built)
        self.load_row: Callable[[Sequence[Any]], dict[str, Any]] = partial(
            load_row, self.names, codes, loads, RawJson, _UNCHANGED
        )
        #: cells → values, unchanged TOAST cells kept as `Toast.UNCHANGED`
        self.load_values: Callable[[Sequence[Any]], tuple[Any, ...]] = partial(
            load_values, codes, loads, RawJson, _UNCHANGED
        )

    def check_width(self, cells: Sequence[Any]) -> None:
        if len(cells) != self.width:
            raise ProtocolError(
                f"{self.schema}.{self.table}: tuple of {len(cells)} columns, "
                f"relation has {self.width}"
            )

    def unloadable(self, ex: Exception) -> ProtocolError:
        # The exception text may quote row values: keep it out of the message.
        return ProtocolError(
            f"{self.schema}.{self.table}: a value could not be loaded ({type(ex).__name__})"
        )

    def values(self, cells: Sequence[Any]) -> Sequence[Any]:
        """Load one tuple; unchanged TOAST cells stay `Toast.UNCHANGED`."""
        self.check_width(cells)
        try:
            return self.load_values(cells)
        except LOAD_ERRORS as ex:
            raise self.unloadable(ex) from ex

    def row_of(self, cells: Sequence[Any]) -> dict[str, Any]:
        """Load one tuple as a dict, leaving out cells the server did not send."""
        self.check_width(cells)
        try:
            return self.load_row(cells)
        except LOAD_ERRORS as ex:
            raise self.unloadable(ex) from ex

    def old_of(self, cells: Sequence[Any], is_key: bool) -> dict[str, Any]:
        """An old tuple as a dict: the key columns of a 'K' one, the sent cells of an 'O'."""
        return self.key(self.values(cells)) if is_key else self.row_of(cells)

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        """A full tuple as a dict, leaving out cells the server did not send."""
        if _UNCHANGED in values:
            return {n: v for n, v in zip(self.names, values, strict=True) if v is not _UNCHANGED}
        return dict(zip(self.names, values, strict=True))

    def key(self, values: Sequence[Any]) -> dict[str, Any]:
        """A key-only ('K') tuple as a dict of the replica identity columns."""
        names = self.names
        return {names[i]: values[i] for i in self.key_indexes if values[i] is not _UNCHANGED}
