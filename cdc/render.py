"""JSON rendering that matches PostgreSQL's `to_jsonb(row)` byte for value.

`cdc.changes` loads every cell into a JSON-ready Python value: `int`, `bool`, `str`, `None`,
`list`, `dict`, or `RawJson` for text that is already JSON (a number exactly as PostgreSQL
printed it, or the text of a json/jsonb value). `dumps` hands the plain values to orjson and
embeds each `RawJson` verbatim through `orjson.Fragment`, so `1.50` stays `1.50` and a numeric
with 40 digits keeps all of them: no float ever sits between PostgreSQL and the client.

`RawJson` is a `str` subclass so that masks, filters and tests can treat it as the text it is;
`OPT_PASSTHROUGH_SUBCLASS` stops orjson from serializing it as a JSON string and routes it to
the default hook instead. Any other object orjson does not know is a bug upstream: the hook
raises `TypeError` rather than guessing a spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

__all__ = [
    "RawJson",
    "dumps",
    "raw_json_mask",
    "raw_json_mask_py",
    "restore_raw_json",
    "tag_raw_json",
    "untag_raw_json",
]


class RawJson(str):
    """Text already in JSON syntax, rendered verbatim (never quoted, never re-parsed).

    The caller guarantees validity: a number as PostgreSQL printed it, or json/jsonb text.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"RawJson({str.__repr__(self)})"


_Fragment = orjson.Fragment
_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS


def _default(obj: Any) -> Any:
    if type(obj) is RawJson:
        return _Fragment(str(obj))  # Fragment wants an exact str
    raise TypeError(f"cannot render {type(obj).__name__} as JSON")


def dumps(obj: Any) -> bytes:
    """Serialize `obj` to compact JSON bytes, embedding `RawJson` values as they are.

    Raises:
        TypeError: `obj` holds a value that has no JSON form here (orjson's
            `JSONEncodeError` is a `TypeError` subclass).
    """
    return orjson.dumps(obj, default=_default, option=_OPTIONS)


_NUL = "\x00"


def tag_raw_json(value: object) -> str:
    """An orjson `default=` for keeping rows as JSON and getting them back typed: a `RawJson`
    cell (a number, json) is written as a string starting with NUL, which no PostgreSQL text
    value can contain. Anything else orjson cannot write is an error."""
    if type(value) is RawJson:
        return _NUL + value
    raise TypeError(f"cannot keep {type(value).__name__} as JSON")


def untag_raw_json(value: Any) -> Any:
    """The inverse of `tag_raw_json` over a decoded value: NUL-tagged strings become `RawJson`."""
    kind = type(value)
    if kind is str:
        return RawJson(value[1:]) if value.startswith(_NUL) else value
    if kind is list:
        return [untag_raw_json(item) for item in value]
    if kind is dict:
        return {name: untag_raw_json(item) for name, item in value.items()}
    return value


_PLAIN = frozenset({str, int, float, bool, type(None)})


def raw_json_mask_py(row: dict[str, Any] | None, raw_json: type) -> int:
    """Which of a typed row's values are `raw_json` (`RawJson`), as bits by position (bit i:
    the i-th value), so that the row can be kept as plain JSON, which orjson writes without a
    `default=` call per such value, and typed again by `restore_raw_json`.

    0 for None; -1 when bits cannot say it all: not a dict, more than 63 values, or a value
    other than str, int, float, bool, None or `raw_json` (a list or dict may hold RawJson
    inside): keep that row with `tag_raw_json` instead. `cdc._speedups.raw_json_mask` is the
    same function in C.
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
    """The inverse of `raw_json_mask` over the row read back from JSON."""
    if not mask or row is None:
        return row
    return {
        name: RawJson(value) if mask >> i & 1 else value
        for i, (name, value) in enumerate(row.items())
    }


raw_json_mask: Callable[[dict[str, Any] | None, type], int]
try:
    from cdc._speedups import raw_json_mask
except ImportError:  # built without a C compiler
    raw_json_mask = raw_json_mask_py
