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

from typing import Any

import orjson

__all__ = ["RawJson", "dumps", "tag_raw_json", "untag_raw_json"]


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
