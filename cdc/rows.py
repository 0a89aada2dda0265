"""Tuple cells → typed values with one loader per column: the per-row loop of `cdc.changes`.

Why it exists: turning a row's text cells into values is most of the CDC path's CPU, so it runs
in C (`cdc._speedups.load_row` / `load_values`) when the extension was built, and as
`load_row_py` / `load_values_py` otherwise. The loaders (psycopg's, and those of
`cdc.changes`) define every value; the C loop only skips the Python call for the common text
forms, and a column's code says which form its loader produces:

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
from typing import Any

from psycopg import abc

__all__ = [
    "BOOL",
    "CALL",
    "INT",
    "JSON",
    "NUMERIC",
    "TEXT",
    "TIMESTAMP",
    "TIMESTAMPTZ",
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
